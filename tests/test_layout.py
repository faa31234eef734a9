"""The three jobs stay apart: the runtime never imports training or the benchmark."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_runtime_modules_never_import_training_or_bench() -> None:
    code = (
        "import sys\n"
        "import worker.app, worker.tasks, worker.runner, worker.flush, worker.cli\n"
        "import worker.sentiment.assemble, api.app, producer.cli\n"
        "from click.testing import CliRunner\n"
        "r = CliRunner().invoke(producer.cli.main, ['model', '--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "for name in ('train', 'eval', 'calibrate', 'speed', 'path'):\n"
        "    assert f'  {name} ' in r.output, r.output\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('training', 'bench'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_without_the_training_and_bench_packages_their_commands_say_what_to_install() -> None:
    # As in the container image: the runtime folders only. A meta-path finder
    # refuses the two packages, like an install that lacks them.
    code = (
        "import sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('training', 'bench'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "import producer.cli\n"
        "from click.testing import CliRunner\n"
        "for args, hint in ((['model', 'train', '--out', 'x'], 'bertstream[train]'),\n"
        "                   (['model', 'eval'], 'bertstream[train]'),\n"
        "                   (['bench', '--quick'], 'bertstream[bench]')):\n"
        "    r = CliRunner().invoke(producer.cli.main, args)\n"
        "    assert r.exit_code == 2, (args, r.output)\n"
        "    assert hint in r.stderr and 'Traceback' not in r.output, r.output\n"
        "r = CliRunner().invoke(producer.cli.main, ['model', 'path', '--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print('ok')\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
