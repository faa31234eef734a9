"""Option parsers shared by the CLI's commands."""

from __future__ import annotations

import datetime as dt

import click

from contract.errors import InvalidInput
from contract.results import as_utc


def parse_time(ctx: click.Context, param: click.Parameter, value: str | None) -> dt.datetime | None:
    """A click callback: ISO 8601 text as an aware UTC datetime (naive means UTC).

    A time whose UTC is out of range is :class:`InvalidInput`: one line and exit 2,
    as every bad input, not a traceback."""
    if value is None:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 date/time") from exc
    try:
        return as_utc(parsed)  # naive means UTC: everything is stored in UTC
    except InvalidInput as exc:
        raise InvalidInput(f"{'/'.join(param.opts) or param.name}: {exc}") from exc
