"""``bertstream db upgrade|downgrade|current|history``: the results database's schema revisions."""

from __future__ import annotations

import click
import sqlalchemy as sa

from contract import migrate
from contract.results import ResultStore
from contract.settings import Settings


def _store(ctx: click.Context) -> tuple[ResultStore, str]:
    settings = ctx.find_object(Settings) or Settings.from_env()
    shown = sa.engine.make_url(settings.database_url).render_as_string(hide_password=True)
    return ResultStore.from_settings(settings), shown


@click.group("db")
def db_group() -> None:
    """Create or upgrade the results database's schema (Alembic migrations).

    Run `db upgrade` after installing a new bertstream, before its workers and
    API start: they refuse an outdated schema. It is safe to run any number
    of times, from several hosts at once.
    """


@db_group.command("upgrade")
@click.argument("revision", default="head")
@click.pass_context
def upgrade_command(ctx: click.Context, revision: str) -> None:
    """Apply the migrations up to REVISION (default: the newest), rows kept."""
    store, shown = _store(ctx)
    try:
        prior = migrate.state(store)
        before, after = migrate.upgrade(store, revision)
    finally:
        store.close()
    if before == after:
        click.echo(f"{shown}: already at revision {after}")
    else:
        start = before or ("empty" if prior.empty else "a table from before migrations")
        click.echo(f"{shown}: upgraded {start} -> {after}")


@db_group.command("downgrade")
@click.argument("revision")
@click.pass_context
def downgrade_command(ctx: click.Context, revision: str) -> None:
    """Roll the schema back to REVISION (see `db history`; each revision's note says
    what a rollback drops). Stop the workers and the API first."""
    store, shown = _store(ctx)
    try:
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
