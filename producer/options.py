"""Option parsers shared by the CLI's commands."""

from __future__ import annotations

import datetime as dt
import re

import click

from contract.constants import ENV_PREFIX
from contract.errors import InvalidInput
from contract.results import as_utc

#: The group's options that override a setting: the setting's name -> the option.
SETTING_OPTIONS = {"broker_url": "--broker-url", "database_url": "--database-url"}


def named_as_given(ctx: click.Context | None, message: str) -> str:
    """``message`` naming each setting the command line gave (:data:`SETTING_OPTIONS`) by
    its option: ``BERTSTREAM_NAME=value`` written ``--option=value``, and a hint to ``set
    BERTSTREAM_NAME`` (``or --option``) written ``give another --option``, and a fix of
    a part of it (``the user of BERTSTREAM_NAME``) naming ``--option``. The settings,
    the broker and the store name a refused value by its variable, and a user who typed
    the option, with no such variable set, went looking for one; setting it would change
    nothing, as the option overrides it. A value from the environment keeps its name.
    """
    if ctx is None:
        return message
    given = ctx.find_root().params
    for name, option in SETTING_OPTIONS.items():
        if given.get(name):  # an empty option overrides nothing (the group's callback)
            variable = f"{ENV_PREFIX}{name.upper()}"
            message = message.replace(f"{variable}=", f"{option}=")
            message = re.sub(rf"\bset {variable}(?: or {re.escape(option)})?\b(?!-)",
                             f"give another {option}", message)
            # a fix of a part of the URL: "fix the user of BERTSTREAM_DATABASE_URL"
            message = re.sub(rf"\bof {variable}\b(?![=\w])", f"of {option}", message)
    return message


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
