"""Real worker processes for tests: ``worker.process.WorkerProc`` on the CPU."""

from __future__ import annotations

from pathlib import Path

from contract.settings import Settings
from worker.process import WorkerProc


class WorkerProcess(WorkerProc):
    """A ``python -m worker --device cpu`` subprocess with ``settings`` and ``threads``."""

    def __init__(self, settings: Settings, log_path: Path, *, threads: int = 1) -> None:
        super().__init__(settings.replace(torch_threads=threads), log_path,
                         args=("--device", "cpu"), name="test")

    def wait_ready(self, timeout: float = 90.0) -> WorkerProcess:
        super().wait_ready(timeout)
        return self

    def log(self) -> str:
        """The worker's combined output so far (its tail)."""
        return self.tail()
