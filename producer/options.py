"""Option parsers shared by the CLI's commands."""

from __future__ import annotations

import datetime as dt

import click


def parse_time(ctx: click.Context, param: click.Parameter, value: str | None) -> dt.datetime | None:
    """A click callback: ISO 8601 text as an aware UTC datetime (naive means UTC)."""
    if value is None:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 date/time") from exc
    if parsed.tzinfo is None:  # naive means UTC: everything is stored in UTC
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.astimezone(dt.timezone.utc)
