"""Children sharing the CPU share its cores: with ``BERTSTREAM_TORCH_THREADS`` left at
0 (torch decides) each of several CPU children of one launcher (``--model`` given more
than once) took every core, so N children ran N times the threads the machine has.
"""

from __future__ import annotations

import os

from contract.settings import Settings
from worker.launcher import child_commands, cpu_cores

TWO = [("default", "default"), ("b", "default")]


def threads(children: list[tuple[list[str], dict[str, str]]]) -> list[str | None]:
    return [env.get("BERTSTREAM_TORCH_THREADS") for _, env in children]


def test_cpu_children_share_the_cores() -> None:
    cores = cpu_cores()
    assert cores == len(os.sched_getaffinity(0))
    assert threads(child_commands([], Settings(), models=TWO)) == [str(max(1, cores // 2))] * 2
    three = [*TWO, ("c", "default")]
    assert threads(child_commands([], Settings(), models=three)) == [str(max(1, cores // 3))] * 3


def test_a_set_thread_count_and_gpu_children_are_left_alone() -> None:
    assert threads(child_commands([], Settings(torch_threads=3), models=TWO)) == ["3", "3"]
    assert threads(child_commands(["0", "1"], Settings(), models=TWO)) == ["0"] * 4
    assert threads(child_commands([], Settings())) == ["0"]
