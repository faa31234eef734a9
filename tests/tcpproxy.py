"""A TCP proxy the tests can cut: a real database outage without stopping the database.

``down()`` resets every open connection and refuses new ones (connection
refused), exactly what a client sees when PostgreSQL restarts or the network
drops; ``up()`` accepts again. ``freeze()`` keeps every connection open but
forwards nothing more: a server that went silent (a hung host, a proxy whose
far side is gone), which only a client-side timeout can detect. The database
server itself, shared with other tests, is never touched.

:func:`proxied_pg` puts a proxy in front of the test PostgreSQL and gives the URL
through it. :class:`SilentListener` accepts TCP connections and never says a word.
The proxy itself is :class:`bench.faults.TcpProxy` (the chaos run cuts with it too).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import TypeVar, overload

import sqlalchemy as sa

from bench.faults import TcpProxy

__all__ = ["SilentListener", "TcpProxy", "proxied_pg"]


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
