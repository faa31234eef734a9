"""Device placement and the one-process-per-GPU launcher (no GPU needed)."""

from __future__ import annotations

import os

import pytest
import torch

from contract.errors import ConfigError
from contract.settings import Settings
from worker.device import resolve_placement
from worker.launcher import child_commands, parse_gpus


def test_cpu_placement_is_fp32() -> None:
    p = resolve_placement("cpu", "auto")
    assert p.device.type == "cpu" and p.dtype == torch.float32 and not p.is_cuda
    assert "thread" in p.describe()


def test_int8_is_cpu_only() -> None:
    p = resolve_placement("cpu", "int8")
    assert p.quantize and p.dtype == torch.float32 and "int8" in p.describe()
    assert Settings(dtype="int8").dtype == "int8"
    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CPU only"):
            resolve_placement("cuda:0", "int8")


def test_cpu_refuses_fp16_and_missing_cuda() -> None:
    with pytest.raises(ConfigError):
        resolve_placement("cpu", "float16")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_placement("cuda:0", "auto")


def test_parse_gpus() -> None:
    assert parse_gpus("0, 1,3") == ["0", "1", "3"]
    for bad in ("", "a", "0,,x"):
        with pytest.raises(ValueError):
            parse_gpus(bad)


def test_each_child_sees_one_gpu_and_the_parent_settings() -> None:
    s = Settings(broker_url="redis://h:6379/2", database_url="postgresql+psycopg://u@db/x",
                 max_wait_ms=7)
    children = child_commands(["0", "2"], s)
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in children] == ["0", "2"]
    for cmd, env in children:
        assert cmd[1:4] == ["-m", "worker", "--device"] and cmd[4] == "cuda:0"
        assert env["BERTSTREAM_BROKER_URL"] == "redis://h:6379/2"
        assert env["BERTSTREAM_MAX_WAIT_MS"] == "7"
        # The child rebuilds exactly the parent's settings from its environment.
        assert Settings.from_env(env) == s
    assert children[0][0][6] != children[1][0][6]  # distinct Celery hostnames


def test_procs_per_gpu_starts_several_pinned_children() -> None:
    children = child_commands(["0", "1"], Settings(), procs_per_gpu=2, host="h")
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in children] == ["0", "0", "1", "1"]
    names = [cmd[cmd.index("--hostname") + 1] for cmd, _ in children]
    pid = os.getpid()  # the launcher's: two launchers on one host name theirs apart
    assert names == [f"bertstream-{pid}-gpu0-0@h", f"bertstream-{pid}-gpu0-1@h",
                     f"bertstream-{pid}-gpu1-0@h", f"bertstream-{pid}-gpu1-1@h"]
    with pytest.raises(ValueError, match="at least 1"):
        child_commands(["0"], Settings(), procs_per_gpu=0)


def test_procs_per_gpu_without_gpus_is_refused() -> None:
    from click.testing import CliRunner

    from producer.cli import main

    result = CliRunner().invoke(main, ["worker", "--procs-per-gpu", "2"])
    assert result.exit_code == 2 and "--procs-per-gpu needs --gpus" in result.output


def test_gpus_count_among_the_devices_the_launcher_was_given(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With CUDA_VISIBLE_DEVICES=2,3 set for the launcher (a shared host), --gpus 0,1 are
    devices 2 and 3, as inside any CUDA process; an index past the mask is refused (each
    child was pinned to the bare index, a GPU the launcher was kept from)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    children = child_commands(["0", "1"], Settings(), host="h")
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in children] == ["2", "3"]
    with pytest.raises(ConfigError, match="leaves this launcher 2 device"):
        child_commands(["2"], Settings(), host="h")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in child_commands(["1"], Settings())] == ["1"]
