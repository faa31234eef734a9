"""An app under a real uvicorn in a thread of the test process: for the tests that must
change the app or a limit in process, which a ``bertstream serve`` subprocess cannot."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from worker.process import free_port


@contextlib.contextmanager
def served(app: Any, *, start_timeout_s: float = 30.0, **config: Any) -> Iterator[str]:
    """``app`` served on a free port of 127.0.0.1 (``config``: more ``uvicorn.Config``
    arguments, ``log_level`` ``critical`` unless given) once uvicorn has started: its
    base URL. The server is told to exit on the way out."""
    port = free_port()
    config.setdefault("log_level", "critical")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)  # polling uvicorn's start-up flag
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
