"""Option parsers shared by the CLI's commands."""

from __future__ import annotations

import datetime as dt
import re

import click

from contract.constants import ENV_PREFIX
from contract.errors import InvalidInput
from contract.queries import empty_range
from contract.results import as_utc

#: The group's options that override a setting: the setting's name -> the option.
SETTING_OPTIONS = {"broker_url": "--broker-url", "database_url": "--database-url"}
#: ``ctx.meta`` key: the settings a command's own options gave (:func:`note_setting_options`).
GIVEN_SETTING_OPTIONS = "bertstream.given_setting_options"


def note_setting_options(ctx: click.Context, options: dict[str, str]) -> None:
    """Record the settings this command's options gave, for :func:`named_as_given`.

    ``options`` maps a setting's name to the option that overrides it; the command's
    parameter holding the option's value bears the setting's name. Only an option
    given a value (not left out, not empty) is recorded: a refused value from the
    environment keeps its variable's name."""
    given = ctx.meta.setdefault(GIVEN_SETTING_OPTIONS, {})
    given.update({name: option for name, option in options.items()
                  if ctx.params.get(name) not in (None, "")})


def named_as_given(ctx: click.Context | None, message: str) -> str:
    """``message`` naming each setting the command line gave (:data:`SETTING_OPTIONS`,
    and a command's own, :func:`note_setting_options`) by its option:
    ``BERTSTREAM_NAME=value`` written ``--option=value``, a hint to ``set
    BERTSTREAM_NAME`` (``or --option``) written ``give another --option``, a fix of
    a part of it (``the user of BERTSTREAM_NAME``) naming ``--option``, and the name
    alone (``BERTSTREAM_NAME must be >= 1``) written ``--option``. The settings,
    the broker and the store name a refused value by its variable, and a user who typed
    the option, with no such variable set, went looking for one; setting it would change
    nothing, as the option overrides it. A value from the environment keeps its name.
    """
    if ctx is None:
        return message
    given = ctx.find_root().params
    # an empty option overrides nothing (the group's callback)
    options = {name: option for name, option in SETTING_OPTIONS.items() if given.get(name)}
    options.update(ctx.meta.get(GIVEN_SETTING_OPTIONS, {}))
    for name, option in options.items():
        variable = f"{ENV_PREFIX}{name.upper()}"
        message = message.replace(f"{variable}=", f"{option}=")
        message = re.sub(rf"\bset {variable}(?: or {re.escape(option)})?\b(?!-)",
                         f"give another {option}", message)
        # the name alone: "BERTSTREAM_MAX_WAIT_MS must be >= 1", "the user of ..."
        message = re.sub(rf"\b{variable}\b(?![=\w])", option, message)
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
        parsed = as_utc(parsed)  # naive means UTC: everything is stored in UTC
    except InvalidInput as exc:
        raise InvalidInput(f"{'/'.join(param.opts) or param.name}: {exc}") from exc
    # Whichever bound click reads second (they come in the order typed) checks the range.
    if param.name in ("since", "until"):
        bounds = {"since": ctx.params.get("since"), "until": ctx.params.get("until"),
                  param.name: parsed}
        why = empty_range(bounds["since"], bounds["until"], "--since", "--until")
        if why:
            raise InvalidInput(why)
    return parsed
