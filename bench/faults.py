"""Faults a run can cause for real without touching shared servers: a private
redis-server it may stop, kill and restart, and a TCP proxy in front of a database it may
cut or silence.

Shared by ``bench/chaos.py`` and the tests (``tests/conftest.py``'s ``redis_server``
fixture, ``tests/tcpproxy.py``).

:class:`RedisServer` runs with an append-only file and ``appendfsync always``, as a
production broker would: a restart keeps the queues and kombu's unacked index (unless
stopped with ``lose_data``). :class:`TcpProxy`'s ``down()`` resets every open connection
and refuses new ones, what a client sees when PostgreSQL restarts or the network drops;
``freeze()`` keeps them open but forwards nothing more, a server gone silent.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import redis

from worker.process import die_with_parent, free_port


class RedisServer:
    """A redis-server on a free port and its own data directory: restartable."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        """Start (again) on the same port and data directory; returns once it answers
        (after loading its append-only file)."""
        with open(self.workdir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", str(self.workdir), "--appendonly", "yes", "--appendfsync", "always",
                 "--save", ""], stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent())
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 30
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.BusyLoadingError:
                    time.sleep(0.05)  # loading its AOF: it answers once it is in memory
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self, *, kill: bool = False, lose_data: bool = False) -> None:
        """SIGTERM (or SIGKILL: a crash; the AOF is on disk either way); ``lose_data``
        removes its files too, as a server whose disk is gone would come back empty."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None
        if lose_data:
            for p in self.workdir.iterdir():
                if p.name != "redis.log":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target`` until :meth:`down`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        #: this end of each connection to the server: its port names the server's session
        self._upstream: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._frozen = threading.Event()
        self.port = free_port()
        self.up()

    def upstream_ports(self) -> list[int]:
        """The local ports of the open connections to the server (``client_port`` of
        their sessions in PostgreSQL's ``pg_stat_activity``)."""
        with self._lock:
            self._upstream = [s for s in self._upstream if s.fileno() != -1]
            ports = []
            for s in self._upstream:
                with contextlib.suppress(OSError):
                    ports.append(int(s.getsockname()[1]))
            return ports

    def up(self) -> None:
        """Accept connections on :attr:`port` again."""
        with self._lock:
            if self._listener is not None:
                return
            lst = socket.socket()
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lst.bind(("127.0.0.1", self.port))
            lst.listen(64)
            self._listener = lst
        threading.Thread(target=self._accept, args=(lst,), daemon=True).start()

    def down(self) -> None:
        """Reset every forwarded connection and refuse new ones."""
        with self._lock:
            lst, self._listener = self._listener, None
            conns, self._conns = self._conns, []
            self._upstream = []
        if lst is not None:
            with contextlib.suppress(OSError):
                lst.shutdown(socket.SHUT_RDWR)
            lst.close()
        for c in conns:
            with contextlib.suppress(OSError):
                # RST: the client sees "connection reset".
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # A pipe thread blocked in recv() holds the socket: close() alone only
            # drops the descriptor, and the socket (with a server session in the
            # middle of a transaction, holding its locks) would live on with no
            # descriptor at all until data arrives, which for an idle server is
            # never. shutdown() acts on the socket itself and wakes that recv().
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def close(self) -> None:
        self.down()

    def freeze(self) -> None:
        """Forward nothing more, in either direction, on every connection (kept open)."""
        self._frozen.set()

    def thaw(self) -> None:
        """After :meth:`freeze`: drop the frozen connections (their bytes were lost) and
        forward new ones."""
        self.down()
        self._frozen.clear()
        self.up()

    def _accept(self, lst: socket.socket) -> None:
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return  # listener closed by down()
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                if self._listener is not lst:  # went down meanwhile
                    client.close()
                    server.close()
                    return
                self._conns += [client, server]
                self._upstream.append(server)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self._frozen.is_set():  # frozen: read (the kernel acks) and drop
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
