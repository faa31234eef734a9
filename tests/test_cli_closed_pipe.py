"""A reader that goes away (``bertstream results --all | head -n 1``) stops the command
quietly, as ``cat`` or ``seq`` stop: exit 141 (128 + SIGPIPE), nothing on stderr. It
exited 1, the status of a bertstream error, so a script could not tell the two apart.
The real CLI in a subprocess, its stdout a real pipe."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from contract.results import ResultRecord, ResultStore
from producer.cli import EXIT_PIPE_CLOSED, stdout_closed

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "from producer.cli import main; main()"]
T0 = dt.datetime(2026, 3, 1, 10, 0, tzinfo=dt.timezone.utc)
#: Rows and characters of text each: far more output than a pipe's buffer holds.
ROWS, CHARS = 3000, 400


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The global options of a CLI on a SQLite file of :data:`ROWS` rows, one source each."""
    url = f"sqlite:///{tmp_path_factory.mktemp('pipe') / 'results.db'}"
    store = ResultStore.from_url(url)
    store.create_schema()
    store.upsert([ResultRecord(
        id=f"t{i:05d}", text_sha256=hashlib.sha256(str(i).encode()).hexdigest(),
        text_chars=CHARS, model="m1", status="done", source=f"source-{i:05d}-" + "s" * 100,
        text=f"text {i} " + "x" * CHARS, finished_at=T0 + dt.timedelta(seconds=i),
        label="positive", score=0.9, scores={"positive": 0.9, "negative": 0.1})
        for i in range(ROWS)])
    store.close()
    return ["--database-url", url, "--broker-url", "redis://127.0.0.1:1/0"]


def _into_head(args: list[str]) -> tuple[int, bytes, bytes]:
    """Run the CLI with its stdout piped into ``head -n 1``: its exit status and stderr,
    and what head printed."""
    cli = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           cwd=ROOT)
    assert cli.stdout is not None and cli.stderr is not None
    head = subprocess.Popen(["head", "-n", "1"], stdin=cli.stdout, stdout=subprocess.PIPE)
    cli.stdout.close()  # head holds the only read end: when it exits, the pipe is closed
    first, _ = head.communicate(timeout=120)
    err = cli.stderr.read()
    cli.stderr.close()
    return cli.wait(timeout=120), err, first


@pytest.mark.parametrize("args, first", [
    (["results", "--all"], b"ID "),
    (["results", "--all", "--format", "csv", "--excel-safe"], b"id,"),
    (["results", "--all", "--format", "json"], b"["),
    (["results", "--aggregate", "source", "--format", "csv"], b"source,count"),
], ids=["table", "csv", "json", "aggregate"])
def test_a_reader_that_goes_away_stops_the_command_quietly(filled: list[str], args: list[str],
                                                           first: bytes) -> None:
    code, err, printed = _into_head([*filled, *args])
    assert printed.startswith(first)
    assert (code, err) == (EXIT_PIPE_CLOSED, b"")


@pytest.mark.parametrize("args", [["results", "--aggregate", "label"], ["db", "history"],
                                  ["results", "--limit", "1", "--format", "json"],
                                  ["compare", "--model", "a", "--model", "b"], ["--help"]])
def test_a_pipe_closed_before_the_first_write_is_as_quiet(filled: list[str],
                                                          args: list[str]) -> None:
    """Short outputs, written at once: the reader had gone before the command started."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([*CLI, *filled, *args], stdout=write, stderr=subprocess.PIPE,
                              cwd=ROOT, timeout=120)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (EXIT_PIPE_CLOSED, b"")


def test_only_stdout_whose_reader_left_counts_as_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken pipe elsewhere (an ``--ids-out`` FIFO whose reader left) is no reason to
    stop quietly: the check looks at stdout itself."""
    read, write = os.pipe()
    out = os.fdopen(write, "w")
    monkeypatch.setattr(sys, "stdout", out)
    try:
        assert not stdout_closed()  # its reader is still there
        os.close(read)
        assert stdout_closed()
    finally:
        monkeypatch.undo()
        out.close()
