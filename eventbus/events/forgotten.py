"""``subject.forgotten``: the event ``EventStore.forget`` records when it forgets a subject.

Projections that copied a subject's personal data subscribe to it and drop their copies.
"""

from __future__ import annotations

from eventbus.events.model import Event

__all__ = ["FORGOTTEN_STREAM", "SubjectForgotten"]

FORGOTTEN_STREAM = "eventbus.forgotten"
"""The stream of every ``subject.forgotten`` event, in the order subjects were forgotten."""


class SubjectForgotten(Event, type="subject.forgotten"):
    """Subject ``subject`` was forgotten: its personal data now reads as placeholders."""

    subject: str
