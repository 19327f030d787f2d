"""Errors that retrying cannot cure, told apart from outages, with what to fix.

``permanent`` is the one classification the workers, the relay, the responders (through
``Backoff``) and the command line's start-up checks share.
"""

from __future__ import annotations

import re

import amqp.exceptions

# A queue or exchange declared again with other arguments (queue type, DLX, exchange type).
_DECLARES = {(50, 10): "queue", (40, 10): "exchange"}
_TABLES = "the eventbus tables are missing or out of date: run 'eventbus db upgrade'"
# What a database error says (PostgreSQL's SQLSTATE first, then the driver's text) -> the fix.
_DATABASE_FIXES = (
    (r'^42P01|^42703|no such (table|column)|(relation|column) ".*" does not exist', _TABLES),
    (r'^3D000|database ".*" does not exist', "the database does not exist: create it, then "
     "run 'eventbus db upgrade'"),
    (r'^28P01|^28000|password authentication failed|role ".*" does not exist', "the database "
     "refuses the login: check the user and password of the database URL"),
)  # fmt: skip


def permanent(exc: BaseException) -> str | None:
    """What to fix when ``exc`` is an error that retrying cannot cure (a login the broker or the
    database refuses, a database or table that does not exist); None for an outage."""
    import sqlalchemy.exc

    error: BaseException | None = exc
    while error is not None:
        if isinstance(error, amqp.exceptions.AccessRefused):
            if "login was refused" in str(error).lower():
                return "the broker refuses the login: check the user and password of the broker URL"
            return "the broker refuses access: check the user's permissions (rabbitmqctl)"
        if isinstance(error, amqp.exceptions.NotAllowed):  # vhost not found, access refused
            return "the broker refuses the virtual host: check the broker URL's vhost and the user"
        if isinstance(error, amqp.exceptions.PreconditionFailed) and error.method_sig in _DECLARES:
            what = _DECLARES[error.method_sig]
            return f"the {what} exists on the broker with other settings ({error.reply_text}): " + (
                delivery_fix(str(error.reply_text))
                or f"delete the {what}, or start with the settings it was declared with"
            )
        if isinstance(error, sqlalchemy.exc.DBAPIError):
            orig = error.orig
            code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None) or ""
            fix = next((f for p, f in _DATABASE_FIXES if re.search(p, f"{code} {orig}")), None)
            if fix is _TABLES and "eventbus_" not in str(error):  # not an eventbus statement
                return "a table or column is missing: run the migrations ('eventbus db upgrade')"
            return fix
        error = error.__cause__
    return None


def delivery_fix(refusal: str) -> str | None:
    """The fix when a queue's refused redeclare is about ``max_priority`` or
    ``on_expired='dead_letter'`` (docs/delivery.md); None for other arguments."""
    if "x-max-priority" not in refusal and "x-dead-letter" not in refusal:
        return None
    return (
        "the handler's max_priority or on_expired='dead_letter' changes its queue's arguments, "
        "which RabbitMQ cannot do to an existing queue: stop its workers once it is drained, "
        "delete it (rabbitmqctl delete_queue NAME) and start them again, or keep the old setting"
    )


def first_line(exc: BaseException) -> str:
    """``Type: message`` of ``exc`` (of a driver's error, without SQL), its first line only."""
    error = getattr(exc, "orig", None) or exc
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
