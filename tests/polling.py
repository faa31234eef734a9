"""Waiting in tests for what another process does: poll until a check holds."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def until(check: Callable[..., Any], timeout: float = 10.0, what: str = "condition",
          every: float = 0.05) -> Any:
    """Poll ``check`` every ``every`` seconds until it gives something truthy, and return
    that; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:.0f} s")
        time.sleep(every)
