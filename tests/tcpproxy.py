"""A TCP proxy the tests can cut: a real database outage without stopping the database.

``down()`` resets every open connection and refuses new ones (connection
refused), exactly what a client sees when PostgreSQL restarts or the network
drops; ``up()`` accepts again. ``freeze()`` keeps every connection open but
forwards nothing more: a server that went silent (a hung host, a proxy whose
far side is gone), which only a client-side timeout can detect. The database
server itself, shared with other tests, is never touched.

:func:`proxied_pg` puts a proxy in front of the test PostgreSQL and gives the URL
through it. :class:`SilentListener` accepts TCP connections and never says a word.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from typing import TypeVar, overload

import sqlalchemy as sa


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target`` until :meth:`down`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._frozen = threading.Event()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.up()

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


_P = TypeVar("_P", bound=TcpProxy)


@overload
def proxied_pg(pg_url: str) -> tuple[TcpProxy, str]: ...
@overload
def proxied_pg(pg_url: str, proxy_cls: type[_P]) -> tuple[_P, str]: ...
def proxied_pg(pg_url: str, proxy_cls: type[TcpProxy] = TcpProxy) -> tuple[TcpProxy, str]:
    """A proxy (``proxy_cls``, up) to the database of ``pg_url``, and the same URL through
    it: what a worker or store is given so that the test can cut its database."""
    url = sa.engine.make_url(pg_url)
    proxy = proxy_cls(url.host or "127.0.0.1", url.port or 5432)
    return proxy, url.set(host="127.0.0.1", port=proxy.port).render_as_string(
        hide_password=False)


class SilentListener:
    """Accepts TCP connections on 127.0.0.1:<port> and never answers."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._held: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._held.append(conn)  # kept open, never read

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for c in self._held:
            with contextlib.suppress(OSError):
                c.close()
