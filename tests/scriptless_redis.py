"""Private redis-servers that refuse scripts, for the tests of the script-free paths:
an ACL user without ``+@scripting`` (NOPERM), or a server without Lua (its scripting
commands renamed away: unknown commands). Never the shared test Redis: its ACLs and
configuration stay as they are."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from worker.process import die_with_parent, free_port

#: The scripting commands a server without Lua lacks.
NO_LUA = [arg for name in ("EVAL", "EVALSHA", "SCRIPT", "EVAL_RO", "EVALSHA_RO", "FCALL")
          for arg in ("--rename-command", name, "")]

#: The two ways Redis refuses scripts, as ``pytest.fixture(params=...)`` takes them.
REFUSALS = ["acl-without-scripting", "server-without-lua"]


class Server:
    """A private redis-server started with ``extra`` arguments; an ``admin`` client on it
    (the default user, which may run scripts where the server has them)."""

    def __init__(self, workdir: Path, extra: list[str]) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(workdir), "--save", "", "--appendonly", "no", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=die_with_parent())
        self.admin = redis.Redis(port=self.port)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.admin.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.05)

    def url(self, user: str = "") -> str:
        return f"redis://{user}127.0.0.1:{self.port}/0"

    def add_user_without_scripting(self) -> str:
        """Create an ACL user allowed everything but scripts; its URL."""
        self.admin.execute_command("ACL", "SETUSER", "app", "on", ">pw", "~*", "&*",
                                   "+@all", "-@scripting")
        return self.url("app:pw@")

    def stop(self) -> None:
        self.admin.close()
        self.proc.terminate()
        self.proc.wait(timeout=20)


@contextmanager
def refusing_server(kind: str, workdir: Path) -> Iterator[tuple[Server, str]]:
    """A private server of ``kind`` (one of :data:`REFUSALS`) and the URL of a user on it
    whose scripts Redis refuses; stopped on exit."""
    server = Server(workdir, NO_LUA if kind == "server-without-lua" else [])
    try:
        yield server, (server.add_user_without_scripting()
                       if kind == "acl-without-scripting" else server.url())
    finally:
        server.stop()
