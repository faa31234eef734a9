"""``bertstream rescore`` and ``bertstream compare``: results over time, across models."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Iterator
from typing import Any

import click

from contract.constants import LANGS, MODEL_NAME_PATTERN
from contract.errors import (
    EXIT_REJECTED,
    BrokerUnavailable,
    ConfigError,
    Interrupted,
    InvalidInput,
)
from contract.messages import printable
from contract.queries import Comparison, Filters, compare, stored_texts, text_counts
from contract.settings import Settings
from producer.client import Client
from producer.formatting import render_rows
from producer.options import parse_time
from producer.sources import SourceRecord
from producer.stream import stream

#: Ids looked up at once when skipping the tasks the new model already did.
DONE_CHUNK = 500


def _settings(ctx: click.Context) -> Settings:
    settings = ctx.find_object(Settings)
    if settings is None:  # pragma: no cover - the group callback always sets it
        raise ConfigError("settings were not built")
    return settings


def _model_name(value: str) -> str:
    import re

    if not re.fullmatch(MODEL_NAME_PATTERN, value):
        raise click.BadParameter(f"{value!r} is not a model name (letters, digits, . _ -)")
    return value


def _filter_options(f: Any) -> Any:
    for option in reversed([
        click.option("--source", help="Only this source tag."),
        click.option("--label", help="Only texts with this label (the reference model's)."),
        click.option("--lang", type=click.Choice(LANGS), help="Only texts in this language."),
        click.option("--since", callback=parse_time,
                     help="Finished at or after (ISO 8601, UTC if naive)."),
        click.option("--until", callback=parse_time,
                     help="Finished before (ISO 8601, UTC if naive)."),
    ]):
        f = option(f)
    return f


@click.command("rescore")
@click.option("--model", "model", required=True, help="The named model to score the texts.")
@_filter_options
@click.option("--max-queue", type=click.IntRange(min=1), help="Backpressure bound in messages.")
@click.option("--no-progress", is_flag=True,
              help="Hide the progress bar (drawn only when stderr is a terminal).")
@click.pass_context
def rescore_command(ctx: click.Context, model: str, source: str | None, label: str | None,
                    lang: str | None, since: dt.datetime | None, until: dt.datetime | None,
                    max_queue: int | None, no_progress: bool) -> None:
    """Re-enqueue stored texts for another model, on the bulk lane.

    Each matching task (its latest result) is sent under its own id with its
    source and meta, and the text any of its rows kept (a model's worker run
    with BERTSTREAM_STORE_TEXT=false keeps none); the new model's rows are
    stored beside the old ones.
    Tasks the model already scored are skipped, so a second run sends
    nothing once the first run's tasks are scored (tasks still queued are
    sent again); for --model default that needs a live worker of the default
    model, which tells the name its rows are stored under (refused, exit 2,
    while none is). Exits 5 when some tasks were refused. Reads in bounded memory (pages of
    rows, a database restart ridden out between them); the stream's
    backpressure and progress bar apply. Needs a Redis broker URL, as submit and
    stream do. Stopped by Ctrl-C or SIGTERM it exits 130 saying how many tasks
    were sent; a rerun skips those the model has done.
    """
    # cli imports this module: its helpers are imported once it is loaded
    from producer.cli import (
        _publishing_settings,
        _say_paused,
        _sigterm_interrupts,
        show_progress,
        warn_if_unserved,
    )

    _model_name(model)
    settings = _publishing_settings(ctx, model)  # as submit and stream: a Redis broker only
    filters = Filters(source=source, label=label, lang=lang, since=since, until=until)
    rerun = f"rerun rescore: tasks already done by {model} are skipped"
    with _sigterm_interrupts(), Client(settings) as client:
        try:
            if not client.has_results_table():
                raise InvalidInput("nothing is stored yet")
            # The rows of `default` carry the default model's own name, which only its live
            # workers tell: unknown, no task could be skipped (every run would send them all).
            stored = str(client.stored_model(model))
            warn_if_unserved(client, optional_model=False)
            total, with_text = text_counts(client.store, filters)
            if total == 0:
                click.echo("no stored task matches: nothing to re-score")
                return
            if with_text == 0:
                raise InvalidInput(
                    f"none of the {total} matching tasks kept its text (they were analysed "
                    "with BERTSTREAM_STORE_TEXT=false): nothing can be re-scored")
            if with_text < total:
                click.echo(f"{total - with_text} of {total} matching tasks did not keep "
                           "their text: they are skipped", err=True)
            skipped = [0]
            records = _not_done(client, stored_texts(client.store, filters), stored, skipped)
            bar = show_progress(no_progress)
            report = stream(client, records, max_queue_length=max_queue,
                            progress=bar, keep_ids=False, linger_s=None,
                            on_wait=None if bar else _say_paused)
        except KeyboardInterrupt as exc:  # before the stream began: nothing was sent
            raise Interrupted(f"interrupted; {rerun}", sent=0) from exc
        except (BrokerUnavailable, Interrupted) as exc:
            # the stream's "resume from line N" means nothing here: rescore reads no lines
            raise type(exc)(f"{exc.reason}; {rerun}", sent=exc.sent) from exc
    shown = model if stored == model else f"{model} ({stored})"
    click.echo(f"re-scoring with {shown}: sent {report.accepted} task(s) in "
               f"{report.messages} message(s), {skipped[0]} already scored by it, "
               f"{report.rejected} refused")
    for error in report.errors[:10]:
        click.echo(f"  {printable(str(error.id))}: {printable(error.reason)}", err=True)
    if report.rejected:
        ctx.exit(EXIT_REJECTED)  # as a stream that refused some lines: scripts must see it


def _not_done(client: Client, rows: Iterable[dict[str, Any]], model: str,
              skipped: list[int]) -> Iterator[SourceRecord]:
    """``rows`` as source records, minus the tasks ``model`` already scored (``done``)."""
    chunk: list[dict[str, Any]] = []
    line = 0

    def emit() -> Iterator[SourceRecord]:
        nonlocal line
        done = client.store.done_ids([r["id"] for r in chunk], model=model)
        for row in chunk:
            if row["id"] in done:
                skipped[0] += 1
                continue
            line += 1
            item = {k: v for k, v in row.items() if v is not None}
            yield SourceRecord(line=line, item=item)
        chunk.clear()

    for row in rows:
        chunk.append(row)
        if len(chunk) >= DONE_CHUNK:
            yield from emit()
    if chunk:
        yield from emit()


@click.command("compare")
@click.option("--model", "models", multiple=True, required=True, metavar="NAME",
              help="Give twice: the reference model A, then model B.")
@_filter_options
@click.option("--top", type=click.IntRange(min=0, max=1000), default=10, show_default=True,
              help="Texts with the largest change shown.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@click.pass_context
def compare_command(ctx: click.Context, models: tuple[str, ...], source: str | None,
                    label: str | None, lang: str | None, since: dt.datetime | None,
                    until: dt.datetime | None, top: int, fmt: str) -> None:
    """How model B's results differ from model A's on the texts both scored.

    Agreement rate, label flips each way, the mean change of B's probability
    of A's label, and the texts B moved most. Computed in SQL.
    """
    if len(models) != 2 or models[0] == models[1]:
        raise click.UsageError("give --model twice, with two different models: A then B")
    for name in models:
        _model_name(name)  # as rescore and the API's /v1/compare: a name no model can have
    filters = Filters(source=source, label=label, lang=lang, since=since, until=until)
    with Client(_settings(ctx)) as client:
        if not client.has_results_table():
            raise InvalidInput("nothing is stored yet")
        a, b = (str(client.stored_model(name)) for name in models)  # default: its own name
        if a == b:
            raise InvalidInput(f"default is the default model, {a}: compare two different models")
        result = compare(client.store, a, b, filters, top=top)
    from producer.cli import echo_text  # cli imports this module

    if fmt == "json":
        echo_text(json.dumps(result.as_dict(), ensure_ascii=False, indent=2, default=str))
        return
    echo_text(describe(result))


def describe(result: Comparison) -> str:
    """The comparison as text for a terminal."""
    a, b = result.model_a, result.model_b
    if not result.texts:
        return f"no task has a done result from both {a} and {b}"
    lines = [f"{b} vs {a}: {result.texts} texts scored by both",
             f"agreement: {100 * (result.agreement or 0):.1f}% ({result.agree})"]
    lines.append("label flips: " + (", ".join(f"{x} -> {y}: {n}" for x, y, n in result.flips)
                                    or "none"))
    if result.unmatched:
        lines.append(f"note: on {result.unmatched} of these texts {b} has no label named as "
                     f"{a}'s (another label set): agreement and the change compare label "
                     "names, and a label missing counts as probability 0")
    if result.mean_change is not None:
        lines.append(f"mean change of the probability of {a}'s label: "
                     f"{result.mean_change:+.4f}")
    if result.largest:
        lines.append("largest changes:")
        rows = [{"id": r["id"], f"{a}": f"{r['label_a']} {r['score_a']:.3f}",
                 f"{b}": f"{r['label_b']} {r['score_b']:.3f}",
                 "change": f"{r['change']:+.3f}" if r["change"] is not None else "",
                 "text": r["text"]} for r in result.largest]
        lines.append(render_rows(rows, ["id", a, b, "change", "text"], "table"))
    return "\n".join(lines)
