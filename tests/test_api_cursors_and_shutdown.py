"""The HTTP API as a web app meets it, on a real ``bertstream serve`` over the test Redis
and SQLite / PostgreSQL: the cursor of a page ending on a long id outside the BMP is taken
back, and a stopping server answers its open long polls instead of waiting them out."""

from __future__ import annotations

import dataclasses
import datetime as dt
import signal
import socket
import subprocess
import threading
import time
from typing import Any

import httpx

from contract.results import ResultRecord, ResultStore
from contract.settings import Settings

#: The longest id a caller may give (BERTSTREAM_MAX_ID_CHARS), of characters outside the
#: Basic Multilingual Plane: JSON's ASCII escapes spell each as 12 characters.
EMOJI_IDS = ["😀" * 127 + tail for tail in "abc"]


def _walk(http: httpx.Client, route: str, **params: Any) -> list[str]:
    """The ids of every page of ``route``, following ``next_cursor``."""
    ids: list[str] = []
    cursor = None
    for _ in range(10):
        r = http.get(route, params={**params, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        body = r.json()
        ids += [row["id"] for row in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return ids
    raise AssertionError(f"no last page: {ids}")


def test_cursors_of_rows_with_long_non_bmp_ids_are_taken_back(
        settings: Settings, store: ResultStore, api_factory: Any) -> None:
    """A page ending on a row whose id is 128 emoji hands out a ``next_cursor`` the next
    request accepts (it was over the routes' 2,048-character cursor limit: a 422 in the
    middle of a walk), for ``/v1/results`` in both orders and ``/v1/search``."""
    now = dt.datetime.now(dt.timezone.utc)
    store.upsert([ResultRecord(id=i, text_sha256="0" * 64, text_chars=4, model="m",
                               status="done", label="positive", score=0.9, text="good",
                               finished_at=now - dt.timedelta(seconds=n))
                  for n, i in enumerate(EMOJI_IDS)])
    api = api_factory(settings)
    with httpx.Client(base_url=api.url, timeout=10) as http:
        assert _walk(http, "/v1/results", limit=1) == EMOJI_IDS
        assert _walk(http, "/v1/results", limit=1, order="oldest") == EMOJI_IDS[::-1]
        assert _walk(http, "/v1/search", limit=1, q="good") == EMOJI_IDS
        assert _walk(http, "/v1/search", limit=1, id="😀") == sorted(EMOJI_IDS)



def test_a_stopping_server_ends_its_long_polls(bsettings: Settings, api_factory: Any) -> None:
    """SIGTERM to ``bertstream serve`` answers a ``?wait=`` long poll of a queued task at
    once (``queued``) and exits: it waited the poll out first, up to
    BERTSTREAM_API_MAX_WAIT_S (at most a day), holding a restart that long."""
    api = api_factory(dataclasses.replace(bsettings, api_max_wait_s=600))
    r = httpx.post(f"{api.url}/v1/tasks", json={"text": "no worker serves this", "id": "poll-1"})
    assert r.status_code == 202, r.text
    answers: list[httpx.Response | Exception] = []

    def long_poll() -> None:
        try:
            answers.append(httpx.get(f"{api.url}/v1/tasks/poll-1", params={"wait": 600},
                                     timeout=700))
        except httpx.HTTPError as exc:  # the server killed at teardown
            answers.append(exc)

    poll = threading.Thread(target=long_poll, daemon=True)
    poll.start()
    poll.join(1.0)  # the request reaches the server's waiter meanwhile
    assert poll.is_alive() and not answers
    api.proc.send_signal(signal.SIGTERM)
    poll.join(60)  # far below the 600 s the poll would run
    assert not poll.is_alive(), "the long poll held the server's exit"
    assert isinstance(answers[0], httpx.Response), answers
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json() == {"id": "poll-1", "status": "queued"}
    try:
        api.proc.wait(timeout=60)  # uvicorn ends on the signal it was stopped by
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"serve did not exit: {api.log()}") from exc


def test_a_long_poll_whose_client_left_ends_and_holds_no_exit(bsettings: Settings,
                                                              api_factory: Any) -> None:
    """A client (or a proxy) that gives up on a ``?wait=`` long poll ends it: the poll kept
    its place in the waiter for the rest of its wait, and SIGTERM to ``serve`` waited it
    out (uvicorn's shutdown reaches only the connections still open). It ends quietly: the
    poll's task, cancelled but not yet ended, was once asked for its result
    (``InvalidStateError``: a 500, a traceback in the log and in
    ``bertstream_api_requests``)."""
    api = api_factory(dataclasses.replace(bsettings, api_max_wait_s=600))
    r = httpx.post(f"{api.url}/v1/tasks", json={"text": "no worker serves this", "id": "poll-2"})
    assert r.status_code == 202, r.text
    host, port = httpx.URL(api.url).host, httpx.URL(api.url).port
    with socket.create_connection((host, port), timeout=10) as raw:
        raw.sendall(f"GET /v1/tasks/poll-2?wait=600 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        time.sleep(1.0)  # the request reaches the server's waiter meanwhile
    time.sleep(1.0)  # the server sees the connection closed and ends the poll
    metrics = httpx.get(f"{api.url}/metrics").text
    assert 'status="500"' not in metrics, api.log()
    assert "InvalidStateError" not in api.log()
    assert "Traceback" not in api.log()
    api.proc.send_signal(signal.SIGTERM)
    try:
        api.proc.wait(timeout=60)  # far below the 600 s the poll would run
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"an abandoned long poll held serve's exit: {api.log()}") from exc
