"""Torch threads on the CPU as an operator sets them: an explicit
``BERTSTREAM_TORCH_THREADS`` wins; else an ``OMP_NUM_THREADS`` (or ``MKL_NUM_THREADS``),
set to keep several workers from oversubscribing the cores, is honoured; else the
launcher splits the cores between its CPU children. The launcher's split used to override
``OMP_NUM_THREADS``. Each worker's startup line says the count and why."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from contract.settings import Settings
from tests.polling import until
from tests.test_launcher import Launcher, launcher_factory  # noqa: F401 - fixture
from worker.launcher import child_commands, cpu_cores, torch_threads_source

TWO = [("a", "default"), ("b", "default")]


def threads(settings: Settings) -> list[str | None]:
    return [env.get("BERTSTREAM_TORCH_THREADS") for _, env in child_commands([], settings,
                                                                            models=TWO)]


@pytest.mark.parametrize("name", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_an_operators_thread_count_is_not_overridden_by_the_split(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for other in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(other, raising=False)
    split = str(max(1, cpu_cores() // 2))
    assert threads(Settings()) == [split, split]
    monkeypatch.setenv(name, "1")
    assert threads(Settings()) == ["0", "0"]  # left to torch, which reads the variable
    assert threads(Settings(torch_threads=3)) == ["3", "3"]  # the explicit setting wins


@pytest.mark.parametrize("value", ["0", "-1", "abc", "", "  "])
def test_a_thread_variable_openmp_ignores_leaves_the_split(
        value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``OMP_NUM_THREADS=0`` or ``=abc`` is no count: OpenMP warns and ignores it, torch
    takes every core. It used to turn the split off, each child then taking all cores,
    and a worker's startup line named it as the reason for its count."""
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    split = str(max(1, cpu_cores() // 2))
    assert threads(Settings()) == [split, split]
    assert torch_threads_source(Settings()) == "torch's default"


@pytest.mark.parametrize("value", ["4,2", " 3 ", "02", "+3"])
def test_a_thread_count_openmp_takes_is_honoured(
        value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A list per nesting level (``4,2``) is OpenMP syntax: its first count is torch's."""
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert threads(Settings()) == ["0", "0"]
    assert torch_threads_source(Settings()) == f"OMP_NUM_THREADS={value.strip()}"
    monkeypatch.setenv("OMP_NUM_THREADS", "abc")
    monkeypatch.setenv("MKL_NUM_THREADS", value)  # the first valid one is named
    assert torch_threads_source(Settings()) == f"MKL_NUM_THREADS={value.strip()}"


def _startup_threads(log: str) -> list[tuple[int, str]]:
    return [(int(n), why) for n, why in re.findall(r"torch threads: (\d+) \((.*)\)", log)]


def _two_children_log(redis_url: str, sqlite_url: str, tmp_path: Path, tiny_model_dir: Path,
                      factory: Callable[..., Launcher]) -> str:
    """The log of a real launcher of two CPU children on the tiny model, once ready."""
    settings = Settings(broker_url=redis_url, database_url=sqlite_url, device="cpu",
                        queue=f"bst-threads-{uuid.uuid4().hex[:8]}",
                        cache_dir=str(tmp_path / "cache"))
    ready = tmp_path / "ready"
    launcher = factory(settings, "--model", f"a={tiny_model_dir}",
                       "--model", f"b={tiny_model_dir}", "--ready-file", str(ready))
    until(lambda: ready.is_file() or launcher.proc.poll() is not None, 120, "ready file")
    log = launcher.log()
    assert launcher.proc.poll() is None, log
    return log


@pytest.mark.slow
@pytest.mark.parametrize("name", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_cpu_children_of_a_launcher_run_the_operators_thread_count(
        name: str, redis_url: str, sqlite_url: str, tmp_path: Path, tiny_model_dir: Path,
        launcher_factory: Callable[..., Launcher],  # noqa: F811 - the fixture
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two real CPU children under ``NAME=<one more than the split>``: torch in each runs
    that many threads, and the startup line names the variable."""
    for other in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(other, raising=False)
    wanted = max(1, cpu_cores() // 2) + 1
    monkeypatch.setenv(name, str(wanted))
    log = _two_children_log(redis_url, sqlite_url, tmp_path, tiny_model_dir, launcher_factory)
    assert _startup_threads(log) == [(wanted, f"{name}={wanted}")] * 2, log
    assert log.count(f"on cpu ({wanted} threads,") == 2, log


@pytest.mark.slow
@pytest.mark.parametrize("omp", [None, "0"])
def test_without_a_thread_variable_the_children_split_the_cores_and_say_so(
        omp: str | None, redis_url: str, sqlite_url: str, tmp_path: Path, tiny_model_dir: Path,
        launcher_factory: Callable[..., Launcher],  # noqa: F811 - the fixture
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Also under ``OMP_NUM_THREADS=0``, which OpenMP ignores (no count)."""
    for other in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(other, raising=False)
    if omp is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    log = _two_children_log(redis_url, sqlite_url, tmp_path, tiny_model_dir, launcher_factory)
    split = max(1, cpu_cores() // 2)
    why = f"the launcher's split: {split} of {cpu_cores()} cores for 2 workers"
    assert _startup_threads(log) == [(split, why)] * 2, log
