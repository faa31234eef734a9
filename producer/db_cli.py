"""``bertstream db``: the results database's schema revisions (upgrade, downgrade, current,
history), deleting stored results (delete) and repairing the latest flags (settle)."""

from __future__ import annotations

import datetime as dt
import re
from typing import IO

import click
import redis
import sqlalchemy as sa
from redis.backoff import NoBackoff
from redis.retry import Retry

from contract import migrate
from contract.broker import redis_socket_options
from contract.clock import server_time
from contract.constants import DEFAULT_MODEL, LANGS, STATUSES
from contract.errors import InvalidInput, SchemaMismatch, quoted
from contract.messages import id_problem
from contract.results import ResultStore, as_utc, utc_from_timestamp
from contract.settings import REDIS_SCHEMES, Settings, mask_url
from producer.client import Client, missing_sqlite_file
from producer.formatting import unguard_id
from producer.options import parse_time

#: ``--older-than`` units.
AGE_UNITS = {"d": "days", "h": "hours", "m": "minutes"}


def _store(ctx: click.Context) -> tuple[ResultStore, str]:
    """The store and its URL as shown (no password). The store is built first: it checks
    the URL, so one that is not a database URL is a ConfigError (one line, exit 2)."""
    settings = ctx.find_object(Settings) or Settings.from_env()
    store = ResultStore.from_settings(settings)
    shown = sa.engine.make_url(settings.database_url).render_as_string(hide_password=True)
    return store, shown


#: How a missing SQLite file is named: a mistyped path shows as one, not as an empty database.
NO_FILE = "no such file"


def _no_file(ctx: click.Context) -> str | None:
    """The URL as shown when it names an SQLite file that does not exist, else None.

    Opening it would create it, empty: only `db upgrade` may, so a read (`db current`
    in a health check), a dry run or a refused command never leaves a stray
    ``bertstream.db`` behind, as the client reads such a file as no rows.
    """
    settings = ctx.find_object(Settings) or Settings.from_env()
    if not missing_sqlite_file(settings.database_url):
        return None
    return sa.engine.make_url(settings.database_url).render_as_string(hide_password=True)


def _refuse_no_file(ctx: click.Context) -> None:
    """SchemaMismatch (exit 2) for a missing SQLite file, as for an empty database."""
    shown = _no_file(ctx)
    if shown is not None:
        problem = migrate.SchemaState(None, migrate.head_revision(), False).problem()
        raise SchemaMismatch(f"{shown}: {NO_FILE}; {problem}")


@click.group("db")
def db_group() -> None:
    """The results database: its schema (Alembic migrations), deleting results, repairs.

    Run `db upgrade` after installing a new bertstream, before its workers and
    API start: they refuse an outdated schema. It is safe to run any number
    of times, from several hosts at once.
    """


@db_group.command("upgrade")
@click.argument("revision", default="head")
@click.pass_context
def upgrade_command(ctx: click.Context, revision: str) -> None:
    """Apply the migrations up to REVISION (default: the newest), rows kept. A REVISION
    below the database's is refused (exit 2): `db downgrade` rolls back."""
    store, shown = _store(ctx)
    try:
        prior = migrate.state(store)
        if _below(revision, prior.current):
            raise InvalidInput(
                f"{shown} is at revision {prior.current}, above {revision}: nothing changed "
                f"(an upgrade never rolls back); to roll back, run `bertstream db downgrade "
                f"{revision}` (it lists what would be dropped; --yes rolls back)")
        before, after = migrate.upgrade(store, revision)
    finally:
        store.close()
    if before == after:
        click.echo(f"{shown}: already at revision {after}")
    else:
        start = before or ("empty" if prior.empty else "a table from before migrations")
        click.echo(f"{shown}: upgraded {start} -> {after}")


def _below(revision: str, current: str | None) -> bool:
    """True when ``revision`` ('base' or a revision of `db history`) comes before
    ``current``: Alembic's upgrade to it would do nothing."""
    order = ["base", *(rev for rev, _down, _doc in migrate.history())]
    return revision in order and current in order and order.index(revision) < order.index(current)


@db_group.command("downgrade")
@click.argument("revision")
@click.option("--yes", is_flag=True, help="Roll back. Without it, only say what would go.")
@click.pass_context
def downgrade_command(ctx: click.Context, revision: str, yes: bool) -> None:
    """Roll the schema back to REVISION ('base': nothing left); a dry run without --yes,
    listing what each rollback drops (`db history` lists them too). Stop the workers
    and the API first."""
    missing = _no_file(ctx)
    if missing is not None:
        click.echo(f"{missing}: {NO_FILE}; nothing to roll back")
        return
    store, shown = _store(ctx)
    try:
        current, plan = migrate.rollback_plan(store, revision)
        if not plan:
            click.echo(f"{shown}: at revision {current or 'none'}; nothing to roll back")
            return
        if not yes:
            click.echo(f"{shown}: would roll back {current} -> {revision}, dropping:")
            for rev, drops in plan:
                click.echo(f"  {rev}: {drops}")
            click.echo("run again with --yes to roll back")
            return
        before, after = migrate.downgrade(store, revision)
    finally:
        store.close()
    click.echo(f"{shown}: downgraded {before} -> {after or 'empty'}")


@db_group.command("current")
@click.option("--check", is_flag=True,
              help="Exit 1 unless the schema is at this bertstream's revision.")
@click.pass_context
def current_command(ctx: click.Context, check: bool) -> None:
    """Print the database's revision and whether this bertstream can use it."""
    missing = _no_file(ctx)
    if missing is not None:
        shown = f"{missing} ({NO_FILE})"
        schema = migrate.SchemaState(None, migrate.head_revision(), False)
    else:
        store, shown = _store(ctx)
        try:
            schema = migrate.state(store)
        finally:
            store.close()
    problem = schema.problem()
    current = schema.current or ("none (empty)" if schema.empty else "none (unstamped)")
    click.echo(f"{shown}: revision {current}; this bertstream needs {schema.head}")
    if problem:
        click.echo(problem, err=True)
        if check:
            ctx.exit(1)


@db_group.command("history")
def history_command() -> None:
    """List the schema revisions, oldest first."""
    head = migrate.head_revision()
    for revision, down, doc in migrate.history():
        mark = " (head)" if revision == head else ""
        click.echo(f"{down or '<base>'} -> {revision}{mark}: {doc}")
        click.echo(f"    a rollback drops {migrate.rollback_drops(revision)}")


#: The longest ``--older-than``.
MAX_AGE = dt.timedelta(days=100 * 365)


def _age(ctx: click.Context, param: click.Parameter, value: str | None) -> dt.timedelta | None:
    """A click callback: ``90d``, ``12h`` or ``30m`` as a timedelta."""
    if value is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*([dhm])\s*", value)
    if match is None or len(match.group(1)) > 12:
        raise click.BadParameter(f"{value!r} is not an age such as 90d, 12h or 30m")
    try:
        age = dt.timedelta(**{AGE_UNITS[match.group(2)]: int(match.group(1))})
    except OverflowError:  # past timedelta's own bound (a billion days), so past ours
        age = dt.timedelta.max
    if age > MAX_AGE:  # further back than any row, and than a date can go from now
        raise click.BadParameter(f"{value!r} is over {MAX_AGE.days // 365} years")
    return age


@db_group.command("delete")
@click.option("--id", "ids", multiple=True, help="A task id (repeatable): all its rows go.")
@click.option("--ids-file", type=click.File("r", encoding="utf-8-sig"),
              help="Task ids, one per line, UTF-8 ('-': standard input).")
@click.option("--source", help="Only this source tag.")
@click.option("--model", help="Only this model's rows (default: every model's; 'default': "
                               "the default model's, which needs one of its workers alive).")
@click.option("--label", help="Only rows with this label.")
@click.option("--status", type=click.Choice(STATUSES), help="Only rows with this status.")
@click.option("--lang", type=click.Choice(LANGS), help="Only texts detected in this language.")
@click.option("--since", callback=parse_time, help="Finished at or after (ISO 8601, UTC if naive).")
@click.option("--until", callback=parse_time, help="Finished before (ISO 8601, UTC if naive).")
@click.option("--older-than", callback=_age,
              help="Finished more than this long ago (90d, 12h, 30m): a retention rule.")
@click.option("--excel-safe", is_flag=True,
              help="The ids (--id, --ids-file) are as a spreadsheet-safe CSV writes them "
                   "(`results --excel-safe`, the API's CSV export): an id there that starts "
                   "with ' followed by = + - @ or ' has that first ' taken off.")
@click.option("--yes", is_flag=True, help="Delete. Without it, only count what would go.")
@click.pass_context
def delete_command(ctx: click.Context, ids: tuple[str, ...], ids_file: IO[str] | None,
                   source: str | None, model: str | None, label: str | None,
                   status: str | None, lang: str | None, since: dt.datetime | None,
                   until: dt.datetime | None, older_than: dt.timedelta | None,
                   excel_safe: bool, yes: bool) -> None:
    """Delete stored results matching every given filter (a dry run without --yes).

    Rows of every model go unless --model is given, with their long-text
    windows; a task that keeps a row of another model shows that one next.
    Batches of 500 tasks, each its own transaction, so a large delete can
    run beside the workers. A task still queued writes its row when it is
    scored: delete after it finished. At least one filter is required.
    """
    if older_than is not None and until is not None:
        raise click.UsageError("give --until or --older-than, not both")
    wanted = _wanted_ids(ids, ids_file, excel_safe=excel_safe)
    for what, values in (("--id", wanted), ("--source", [source]), ("--label", [label]),
                         ("--model", [model])):
        for value in values:
            problem = None if value is None else id_problem(value)
            if problem is not None:
                raise InvalidInput(f"{what} {quoted(str(value))} {problem}")
    id_filter = wanted if (ids or ids_file is not None) else None
    if all(v is None for v in (id_filter, source, model, label, status, lang, since, until,
                               older_than)):
        raise click.UsageError("give at least one filter (--id, --ids-file, --source, --model, "
                               "--label, --status, --lang, --since, --until, --older-than)")
    if model == DEFAULT_MODEL:
        # Rows carry the default model's own name, never 'default': its live workers tell
        # it (a read does the same); refused, exit 2, while none is alive to say.
        with Client(ctx.find_object(Settings) or Settings.from_env()) as client:
            model = client.stored_model(model)
    _refuse_no_file(ctx)
    store, shown = _store(ctx)
    clock = ""
    try:
        migrate.check(store)  # an outdated schema: deleting would half work, then fail
        migrate.check_privileges(store, migrate.DELETE_PRIVILEGES if yes
                                 else migrate.READER_PRIVILEGES, "`db delete`")
        if older_than is not None:
            until, clock = _cut_off(ctx.find_object(Settings) or Settings.from_env(), store,
                                    older_than)
        count = store.delete(ids=id_filter, source=source, model=model, label=label,
                             status=status, lang=lang, since=since, until=until,
                             dry_run=not yes)
    finally:
        store.close()
    # the cut-off --older-than came to: --until with it deletes just what a dry run counted
    cut = "" if older_than is None or until is None else \
        f" finished before {until.isoformat()} ({clock})"
    if yes:
        click.echo(f"{shown}: deleted {count.rows} row(s) of {count.tasks} task(s){cut}")
    else:
        click.echo(f"{shown}: would delete {count.rows} row(s) of {count.tasks} task(s){cut}; "
                   "run again with --yes to delete them")


def _wanted_ids(ids: tuple[str, ...], ids_file: IO[str] | None, *,
                excel_safe: bool) -> list[str]:
    """The ids of ``--id`` and ``--ids-file``; with ``excel_safe``, as a spreadsheet-safe
    CSV wrote them (:func:`producer.formatting.unguard_id`)."""
    wanted = list(ids)
    if ids_file is not None:
        try:  # utf-8-sig: a byte-order mark (Windows editors) is not part of the first id
            wanted += [line.strip() for line in ids_file if line.strip()]
        except UnicodeDecodeError as exc:
            raise click.BadParameter(f"not UTF-8 text ({exc.reason} at byte {exc.start})",
                                     param_hint="--ids-file") from exc
    if excel_safe:
        if not ids and ids_file is None:
            raise click.UsageError("--excel-safe reads the ids of --id or --ids-file: give one")
        wanted = [unguard_id(value) for value in wanted]
    return wanted


#: Seconds the Redis server's clock is waited for before ``--older-than`` falls back to
#: the database's: a retention job goes on when Redis is down.
CLOCK_WAIT_S = 3.0
#: How the printed cut-off names the clock it was taken on.
REDIS_CLOCK = "the Redis server's clock, which row times are stamped on"


def _cut_off(settings: Settings, store: ResultStore,
             older_than: dt.timedelta) -> tuple[dt.datetime, str]:
    """Now less ``older_than`` in whole seconds (as printed), and the clock it came from.

    Row times are stamped on the Redis server's clock (``contract.clock``: producers,
    the API and the workers all read its ``TIME``), so now is its ``TIME``: a cut by
    another clock deleted younger or older rows than asked, by the distance between the
    two. Without it (a broker other than Redis, a URL that does not parse, Redis
    not answering within :data:`CLOCK_WAIT_S`), the database's clock (PostgreSQL's
    ``CURRENT_TIMESTAMP``; an SQLite file is on this host: the local clock), and the
    clock named says why, also as a warning on stderr.
    """
    server, why = _redis_now(settings)
    if server is not None:
        return utc_from_timestamp(server - older_than.total_seconds()).replace(
            microsecond=0), REDIS_CLOCK
    if store.engine.dialect.name == "sqlite":
        now, clock = dt.datetime.now(dt.timezone.utc), "this host's clock, the SQLite file's"
    else:
        now = store.run(lambda conn: conn.execute(sa.select(sa.func.current_timestamp()))
                        .scalar_one(), "cannot read the database's clock")
        clock = "the database's clock"
    clock = f"{clock}: {why}, so rows stamped on its clock may be cut by their distance"
    click.echo(f"warning: --older-than cut by {clock}", err=True)
    return as_utc(now - older_than).replace(microsecond=0), clock


def _redis_now(settings: Settings) -> tuple[float | None, str]:
    """The Redis server's ``TIME`` (one try, :data:`CLOCK_WAIT_S` at most), or None and
    why it could not be read (no password or host shown)."""
    shown = mask_url(settings.broker_url)
    if not settings.broker_url.startswith(REDIS_SCHEMES):
        return None, f"the broker {shown} is not Redis, whose clock row times are stamped on"
    options = redis_socket_options(settings)
    options.update(socket_connect_timeout=min(settings.redis_connect_timeout_s, CLOCK_WAIT_S),
                   socket_timeout=min(settings.redis_socket_timeout_s, CLOCK_WAIT_S))
    try:
        client = redis.Redis.from_url(settings.broker_url, retry=Retry(NoBackoff(), 0),
                                      **options)
    except ValueError as exc:
        return None, f"the broker URL {shown} cannot be parsed ({exc})"
    try:
        return server_time(client), ""
    except redis.RedisError as exc:
        return None, f"the Redis server's clock cannot be read at {shown} ({exc})"
    finally:
        client.close()


@db_group.command("settle")
@click.pass_context
def settle_command(ctx: click.Context) -> None:
    """Put every task's latest flag right after rows were inserted, deleted or re-dated by
    hand (bertstream's own writes and `db delete` keep them). Safe beside the workers."""
    _refuse_no_file(ctx)
    store, shown = _store(ctx)
    try:
        migrate.check(store)
        migrate.check_privileges(store, migrate.SETTLE_PRIVILEGES, "`db settle`")
        fixed = store.settle_all()
    finally:
        store.close()
    click.echo(f"{shown}: {fixed} latest flag(s) were wrong and are now right" if fixed
               else f"{shown}: every latest flag was right")
