"""Real worker processes for tests: start, wait until ready, stop or kill -9."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from contract.broker import make_celery
from contract.constants import ENV_PREFIX
from contract.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """A ``python -m worker`` subprocess on the CPU with ``settings``."""

    def __init__(self, settings: Settings, log_path: Path, *, threads: int = 1) -> None:
        self.settings = settings
        self.hostname = f"test-{uuid.uuid4().hex[:6]}@localhost"
        self.log_path = log_path
        env = dict(os.environ)
        for key, value in dataclasses.asdict(settings).items():
            env[ENV_PREFIX + key.upper()] = str(value)
        env["BERTSTREAM_TORCH_THREADS"] = str(threads)
        env["HF_HUB_OFFLINE"] = "1"
        env["PYTHONWARNINGS"] = "ignore"
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--device", "cpu", "--hostname", self.hostname],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 90.0) -> WorkerProcess:
        """Block until the worker answers a control ping; fail if it exits."""
        app = make_celery(self.settings)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
                if app.control.ping(destination=[self.hostname], timeout=0.5):
                    return self
            raise TimeoutError(f"worker not ready after {timeout}s:\n{self.log()}")
        finally:
            app.close()

    def log(self) -> str:
        """The worker's combined output so far."""
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-6000:]

    def kill(self) -> None:
        """SIGKILL: the worker gets no chance to ack or clean up."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (warm shutdown), escalating to SIGKILL after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return int(self.proc.returncode)
