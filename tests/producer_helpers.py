"""Helpers shared by the producer tests: read kombu messages off Redis, build result rows."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from click.testing import CliRunner, Result

from contract.results import ResultRecord, utcnow
from contract.settings import Settings
from producer import cli


def invoke(args: list[str], settings: Settings | None = None, **kwargs: Any) -> Result:
    """``bertstream ARGS`` in process, on ``settings`` (none: the CLI reads them from the
    environment); ``kwargs`` go to ``CliRunner.invoke`` (``input``, ``env``...)."""
    return CliRunner().invoke(cli.main, args, obj=settings, **kwargs)


def jsonl_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (an ``--ids-out`` file)."""
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def broker_settings(redis_url: str, database_url: str, **changes: Any) -> Settings:
    """Settings on the test Redis with a queue of their own (no DB parametrisation)."""
    return Settings(
        broker_url=redis_url,
        database_url=database_url,
        queue=f"bst-prod-{uuid.uuid4().hex[:8]}",
        **changes,
    )


def until(check: Callable[[], Any], seconds: float) -> bool:
    """Poll ``check()`` until it is true or ``seconds`` passed; whether it became true
    (the caller asserts, naming what it waited for)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


def lane_messages(redis_url: str, queue: str) -> list[dict[str, Any]]:
    """The kombu envelopes waiting in ``queue``, oldest first, with ``items`` decoded.

    kombu LPUSHes and consumers BRPOP, so the list is read back to front.
    Each envelope gets ``items``: the first positional argument of the task.
    """
    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.lrange(queue, 0, -1)
    finally:
        client.close()
    out = []
    for blob in reversed(raw):
        envelope = json.loads(blob)
        assert envelope["properties"]["body_encoding"] == "base64"
        body = json.loads(base64.b64decode(envelope["body"]))
        args, _kwargs, _embed = body
        envelope["items"] = args[0]
        out.append(envelope)
    return out


def record(
    id: str,
    *,
    text: str = "some text",
    status: str = "done",
    label: str | None = "positive",
    score: float | None = 0.9,
    source: str | None = None,
    error: str | None = None,
    finished_at: dt.datetime | None = None,
) -> ResultRecord:
    """A result row as a worker would write it."""
    return ResultRecord(
        id=id,
        text_sha256=hashlib.sha256(text.encode()).hexdigest(),
        text_chars=len(text),
        model="tiny-test",
        status=status,
        finished_at=finished_at or utcnow(),
        source=source,
        text=text,
        label=label if status == "done" else None,
        score=score if status == "done" else None,
        scores={"positive": score, "negative": 1 - score} if status == "done" and score else None,
        error=error,
        submitted_at=utcnow(),
    )
