"""The CLI's hints for a new user: what to install, which worker to start, how to name a
field, and input quoted as given.

A client-only install (no torch) is imitated in a subprocess whose import system refuses
torch and transformers, as a missing package would: every command that needs them must
say which extra to install, in one line, and exit 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import producer.cli as cli
from contract.settings import Settings
from producer.client import Client
from tests.producer_helpers import invoke, lane_messages

ROOT = Path(__file__).resolve().parent.parent

WORKER_HINT = "this command needs the worker extra: pip install 'bertstream[worker]'"
BENCH_HINT = "this command needs the bench extra: pip install 'bertstream[bench]'"
TRAIN_HINT = "needs the train extra: pip install 'bertstream[train]'"

#: The arguments each command that needs torch is run with (enough to get past its own
#: checks), and the hint it must give. ``serve`` needs no torch (the API never imports it).
TORCH_COMMANDS: dict[str, tuple[list[str], str]] = {
    "worker": (["worker", "--device", "cpu"], WORKER_HINT),
    "demo": (["demo"], WORKER_HINT),
    "bench": (["bench", "--quick"], BENCH_HINT),
    "model path": (["model", "path"], WORKER_HINT),
    "model train": (["model", "train", "--out", "{tmp}/train", "--no-vader"], TRAIN_HINT),
    "model eval": (["model", "eval", "--no-vader"], TRAIN_HINT),
    "model calibrate": (["model", "calibrate", "--no-vader"], TRAIN_HINT),
    "model interpolate": (["model", "interpolate", "--to", "{root}/worker/sentiment/adapter",
                           "--out", "{tmp}/picked", "--no-vader"], TRAIN_HINT),
    "model verdict": (["model", "verdict", "--model", "{tmp}/model", "--no-vader"], TRAIN_HINT),
    "model speed": (["model", "speed", "--no-vader"], TRAIN_HINT),
    "model device-pack": (["model", "device-pack", "--out", "{tmp}/pack"], TRAIN_HINT),
    "model join": (["model", "join", "{tmp}"], TRAIN_HINT),
}
NO_TORCH_COMMANDS = {"serve"}
#: Those that need torch but not transformers.
TORCH_ONLY_COMMANDS = {"model join"}

#: Run in the subprocess: refuse the blocked packages, list the commands `--help` shows
#: (and `model --help`), run each given one, and print what it did as JSON.
PRELUDE = """
import json, sys
BLOCKED = set(sys.argv[1].split(","))
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Refuse())
for name in BLOCKED:
    sys.modules.pop(name, None)
from click.testing import CliRunner
from producer.cli import main
import training.cli
# The train extra's data packages are checked first; CI installs the dev extra only, and
# what this test is about is the heavy modules.
training.cli.TRAIN_DATA_PACKAGES = ()

def commands(args):
    out = CliRunner().invoke(main, args).output
    section = out.split("Commands:", 1)[1]
    return [line.split()[0] for line in section.splitlines() if line.startswith("  ") and
            not line.startswith("   ")]

runs = {}
for key, args in json.loads(sys.argv[2]).items():
    r = CliRunner().invoke(main, args)
    runs[key] = {"code": r.exit_code, "stderr": r.stderr, "output": r.output,
                 "exception": repr(r.exception) if r.exception and
                 not isinstance(r.exception, SystemExit) else None}
heavy = sorted(m for m in BLOCKED if sys.modules.get(m) is not None)
print(json.dumps({"top": commands(["--help"]), "model": commands(["model", "--help"]),
                  "runs": runs, "heavy": heavy}))
"""


def _without(blocked: str, runs: dict[str, list[str]], tmp_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "BERTSTREAM_DATABASE_URL": f"sqlite:///{tmp_path / 'results.db'}",
           "BERTSTREAM_BROKER_URL": "redis://127.0.0.1:1/0",  # nothing listens: never used
           "BERTSTREAM_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", PRELUDE, blocked, json.dumps(runs)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("blocked", ["torch,transformers", "torch", "transformers"])
def test_every_command_needing_torch_says_which_extra_to_install(tmp_path: Path,
                                                                 blocked: str) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    runs = {key: [arg.format(tmp=tmp_path, root=ROOT) for arg in args]
            for key, (args, _hint) in TORCH_COMMANDS.items()}
    seen = _without(blocked, runs, tmp_path)
    # every lazy command `--help` lists is covered (a new one must be added above)
    listed = {name for name in seen["top"] if name in cli.LAZY_COMMANDS} - {"model"}
    listed |= {f"model {name}" for name in seen["model"]}
    assert listed - NO_TORCH_COMMANDS == set(TORCH_COMMANDS)
    for key, (_args, hint) in TORCH_COMMANDS.items():
        if blocked == "transformers" and key in TORCH_ONLY_COMMANDS:
            continue
        run = seen["runs"][key]
        assert run["exception"] is None, (key, run)
        assert run["code"] == 2, (key, run)
        assert "Traceback" not in run["output"], (key, run)
        *_logs, line = run["stderr"].splitlines()
        assert not _logs, (key, run["stderr"])
        assert hint in line and "No module named" in line, (key, line)
    assert seen["heavy"] == []
    assert not (tmp_path / "results.db").exists()  # nothing ran far enough to open it


# -- the no-worker hint for named models ---------------------------------------------



def test_waiting_on_a_named_model_no_worker_serves_names_the_worker_to_start(
        bsettings: Settings) -> None:
    result = invoke(["submit", "x", "--model", "v3", "--wait", "--timeout", "0.5"], bsettings)
    assert result.exit_code == 4, result.output
    family = f"{bsettings.queue}-v3"
    assert f"no worker is alive on queue {family!r}" in result.stderr
    assert "start one with `bertstream worker --model v3=PATH`" in result.stderr
    assert "start one with `bertstream worker`" not in result.stderr


def test_a_submit_to_a_named_model_no_worker_serves_is_sent_with_a_warning(
        bsettings: Settings, redis_url: str) -> None:
    result = invoke(["submit", "x", "--model", "v3"], bsettings)
    assert result.exit_code == 0, result.output
    [task_id] = result.stdout.split()
    [msg] = lane_messages(redis_url, f"{bsettings.queue}-v3.interactive")
    assert [it["id"] for it in msg["items"]] == [task_id]
    [warning] = result.stderr.splitlines()
    assert warning.startswith("warning: no worker is alive on queue ")
    assert "`bertstream worker --model v3=PATH`" in warning


def test_a_submit_to_the_default_model_warns_of_nothing(bsettings: Settings) -> None:
    """Texts queued before the workers start are the common case: no warning there."""
    for args in (["submit", "x"], ["submit", "x", "--model", "default"]):
        result = invoke(args, bsettings)
        assert result.exit_code == 0, result.output
        assert result.stderr == ""


def test_a_stream_to_a_named_model_no_worker_serves_warns_once(bsettings: Settings) -> None:
    result = invoke(["stream", "-", "--model", "v3", "--no-progress"], bsettings,
                    input="a\nb\n")
    assert result.exit_code == 0, result.output
    assert "accepted 2" in result.stdout
    assert result.stderr.count("`bertstream worker --model v3=PATH`") == 1


# -- a JSONL line without 'text' but with other keys ---------------------------------


def test_a_jsonl_line_with_a_misspelt_text_key_gets_the_field_hint(bsettings: Settings) -> None:
    result = invoke(["stream", "-", "--no-progress"], bsettings,
                    input='{"txt": "x"}\n{"text": "fine"}\n{"body": "y", "id": "b"}\n')
    assert result.exit_code == 5, result.output
    lines = {line.split(":", 1)[0].strip(): line for line in result.stdout.splitlines()}
    for number, key in ((1, "txt"), (3, "body")):
        line = lines[f"line {number}"]
        assert "missing 'text'" in line and f"unknown field(s) [{key!r}]" in line, line
        assert "--text-field" in line, line


def test_a_mapped_record_without_a_text_field_names_the_fields_it_has() -> None:
    import io

    from producer.sources import FieldMap, read_records

    [rec] = read_records(io.BytesIO(b'{"body": "x", "id": "1"}\n'),
                         fields=FieldMap(id="id", given=frozenset({"id"})))
    assert rec.error is not None
    assert rec.error.startswith("missing 'text'")
    assert "'body'" in rec.error and "--text-field" in rec.error
    # the text field named on purpose: that field is what is missing
    [rec] = read_records(io.BytesIO(b'{"text": "x"}\n'),
                         fields=FieldMap(text="content", given=frozenset({"text"})))
    assert rec.error == "missing 'content'"


def test_a_long_list_of_unknown_keys_is_cut_short(bsettings: Settings) -> None:
    line = json.dumps({f"key{n:04d}": n for n in range(500)})
    result = invoke(["stream", "-", "--no-progress"], bsettings, input=line + "\n")
    assert result.exit_code == 5, result.output
    [shown] = [x for x in result.stdout.splitlines() if x.startswith("  line 1:")]
    assert "'key0000'" in shown and "and 495 more" in shown and len(shown) < 500


def test_a_long_unknown_key_is_cut_with_ascii_dots(bsettings: Settings) -> None:
    """The cut is marked with "...", which every terminal encoding shows as it is (an
    ellipsis character came out escaped on a latin-1 terminal)."""
    line = json.dumps({"k" * 60: 1})
    result = invoke(["stream", "-", "--no-progress"], bsettings, input=line + "\n")
    assert result.exit_code == 5, result.output
    [shown] = [x for x in result.stdout.splitlines() if x.startswith("  line 1:")]
    assert f"'{'k' * 40}...'" in shown and "\u2026" not in shown, shown


# -- input quoted once, ids never made up ---------------------------------------------


@pytest.mark.parametrize("command", [
    ["submit", "x", "--source", "bad\x01src"],
    ["stream", "-", "--source", "bad\x01src"],
    ["results", "--source", "bad\x01src"],
    ["report", "--out", "x.png", "--source", "bad\x01src"],
    ["db", "delete", "--source", "bad\x01src"],
])
def test_a_bad_source_is_quoted_with_its_escapes_shown_once(bsettings: Settings,
                                                             command: list[str]) -> None:
    result = invoke(command, bsettings, input="")
    assert result.exit_code == 2, result.output
    assert "'bad\\x01src'" in result.stderr, result.stderr  # one backslash, as typed: \x01
    assert "\\\\" not in result.stderr


def test_submit_many_names_refused_items_by_position_and_only_the_callers_ids(
        bsettings: Settings) -> None:
    with Client(bsettings) as client:
        report = client.submit_many(["", {"text": " ", "id": "mine"}, {"text": ""}, "ok"])
    assert report.accepted == 1
    assert [(e.index, e.id) for e in report.errors] == [(0, None), (1, "mine"), (2, None)]
    shown = [str(e) for e in report.errors]
    assert shown[0].startswith("item 0: text is empty")
    assert shown[1].startswith("item 1 (id mine): text is empty")
    assert shown[2].startswith("item 2: text is empty")
