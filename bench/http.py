"""Measurement 7: the HTTP API, side by side with the Python client.

A real ``bertstream serve`` (one server process) and a load generator of
``concurrency`` keep-alive connections, each sending one request after the
other (plain HTTP/1.1 over asyncio streams: the generator must cost less than
the server it measures). Three figures:

- the server's own limit: ``GET /healthz``, nothing behind it;
- single-text ``POST /v1/tasks`` from all connections, end to end to the
  committed row, with the null model and with the real one (the server
  coalesces concurrent submits into one message per few milliseconds);
- a 256-item bulk POST against ``Client.submit_many`` of the same items
  (publish cost only, one after the other, alternated).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import figures
from bench.services import ResultsProbe, WorkerProc, flush_redis
from contract.settings import Settings
from producer.client import Client
from worker.process import ServeProc

#: Errors of a connection the server closed under a request, and how often one
#: request is resent on a fresh connection after one.
_DROPPED = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError,
            asyncio.IncompleteReadError)
_RESENDS = 2


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str,
                   path: str, body: bytes | None) -> tuple[int, bytes]:
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    writer.write(head.encode("ascii") + b"\r\n" + (body or b""))
    status_line = await reader.readline()
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    payload = await reader.readexactly(length) if length else b""
    return int(status_line.split()[1]), payload


async def _one(host: str, port: int, method: str, path: str,
               body: bytes | None) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        return await _request(reader, writer, method, path, body)
    finally:
        writer.close()


async def _load(port: int, requests: Sequence[tuple[str, str, bytes | None]],
                concurrency: int) -> tuple[float, list[int]]:
    """Send ``requests`` over ``concurrency`` keep-alive connections; (seconds, statuses)."""
    statuses = [0] * len(requests)
    next_index = 0

    reconnects = 0

    async def connection() -> None:
        nonlocal next_index, reconnects
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while next_index < len(requests):
                k = next_index
                next_index += 1
                method, path, body = requests[k]
                for attempt in range(_RESENDS + 1):
                    try:
                        statuses[k], _ = await _request(reader, writer, method, path, body)
                        break
                    except _DROPPED:
                        # The server may close a keep-alive connection as the next
                        # request arrives (its idle timer fired while a loaded host
                        # stalled it). Every request here is idempotent: resend it
                        # on a fresh connection.
                        writer.close()
                        if attempt == _RESENDS:
                            raise
                        reconnects += 1
                        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    if reconnects > max(1, len(requests) // 100):
        raise RuntimeError(f"{reconnects} connections dropped by the server "
                           f"in {len(requests)} requests")
    return time.perf_counter() - t0, statuses


def _check(statuses: list[int], expected: int, what: str) -> None:
    bad = [s for s in statuses if s != expected]
    if bad:
        raise RuntimeError(f"{what}: {len(bad)} of {len(statuses)} requests answered "
                           f"{sorted(set(bad))}, expected {expected}")


def measure_http(settings: Settings, probe: ResultsProbe, workdir: Path,
                 start_worker: Callable[[Settings], WorkerProc], texts: Sequence[str],
                 prefix: str, *, single: int, real: int, concurrency: int, bulk_rounds: int,
                 timeout: float, log: Any = print) -> dict[str, Any]:
    """The HTTP stage's figures (see the module docstring)."""
    api = ServeProc(settings.replace(max_queue_length=1_000_000), workdir / "serve.log",
                    "--log-level", "warning")
    try:
        return _measure(api, settings, probe, start_worker, texts, prefix, single=single,
                        real=real, concurrency=concurrency, bulk_rounds=bulk_rounds,
                        timeout=timeout, log=log)
    except (OSError, RuntimeError) as exc:
        raise RuntimeError(f"http stage: {exc!r}; server log:\n{api.log()}") from exc
    finally:
        api.stop()
        flush_redis(settings.broker_url)


def _measure(api: ServeProc, settings: Settings, probe: ResultsProbe,
             start_worker: Callable[[Settings], WorkerProc], texts: Sequence[str], prefix: str,
             *, single: int, real: int, concurrency: int, bulk_rounds: int, timeout: float,
             log: Any) -> dict[str, Any]:
    """The figures, from a server that ``measure_http`` started and stops."""
    api.wait_ready()
    out: dict[str, Any] = {"concurrency": concurrency,
                           "coalesce_ms": settings.api_coalesce_ms}
    n = max(single, 1)
    log(f"http: server limit, {n} GET /healthz over {concurrency} connections")
    seconds, statuses = asyncio.run(_load(api.port, [("GET", "/healthz", None)] * n,
                                          concurrency))
    _check(statuses, 200, "GET /healthz")
    out["noop_requests_per_s"] = n / seconds
    null = settings.replace(model="null")
    for name, model_settings, count in (("null", null, single), ("model", settings, real)):
        log(f"http: {count} single-text POSTs end to end, {name} worker")
        worker = start_worker(model_settings)
        try:
            out[f"single_{name}"] = _single_e2e(api.port, probe, worker, texts,
                                                f"{prefix}{name}-", count, concurrency,
                                                timeout)
        finally:
            worker.stop()
    log(f"http: bulk POST of 256 items vs Client.submit_many, {bulk_rounds} rounds each")
    out["bulk"] = _bulk_vs_client(api.port, settings, texts, f"{prefix}bulk-", bulk_rounds)
    return out


def _single_e2e(port: int, probe: ResultsProbe, worker: WorkerProc, texts: Sequence[str],
                prefix: str, count: int, concurrency: int, timeout: float) -> dict[str, Any]:
    bodies = [json.dumps({"text": texts[i % len(texts)], "id": f"{prefix}{i}"}).encode("utf-8")
              for i in range(count)]
    t0 = time.time()
    seconds, statuses = asyncio.run(_load(port, [("POST", "/v1/tasks", b) for b in bodies],
                                          concurrency))
    _check(statuses, 202, "POST /v1/tasks")
    probe.wait_for(prefix, count, timeout=timeout, alive=worker.check_alive)
    rows = probe.rows(prefix)
    wall = probe.last_finished(prefix) - t0
    return {"texts": count, "texts_per_s": figures.rate(count, wall),
            "submit_requests_per_s": count / seconds, **figures.latency_ms(rows)}


def _bulk_vs_client(port: int, settings: Settings, texts: Sequence[str], prefix: str,
                    rounds: int) -> dict[str, Any]:
    http_s: list[float] = []
    client_s: list[float] = []
    with Client(settings) as client:
        client.submit_many([{"text": "warm-up", "id": f"{prefix}warm"}])
        for k in range(rounds):
            items = [{"text": texts[(k * 256 + i) % len(texts)], "id": f"{prefix}{k}-{i}"}
                     for i in range(256)]
            body = json.dumps({"items": [{**it, "id": f"h{it['id']}"} for it in items]})
            t0 = time.perf_counter()
            status, _ = asyncio.run(_one("127.0.0.1", port, "POST", "/v1/tasks",
                                         body.encode("utf-8")))
            http_s.append(time.perf_counter() - t0)
            if status != 202:
                raise RuntimeError(f"bulk POST answered {status}")
            t0 = time.perf_counter()
            client.submit_many(items)
            client_s.append(time.perf_counter() - t0)
    http_ms = 1000 * sorted(http_s)[len(http_s) // 2]
    client_ms = 1000 * sorted(client_s)[len(client_s) // 2]
    return {"rounds": rounds, "http_ms": http_ms, "client_ms": client_ms,
            "ratio": http_ms / client_ms if client_ms else float("nan")}
