"""Whether the event types of today can still read the events of a baseline (``check``).

The baseline is a catalog (``eventbus events --json``) of the code that wrote the stored and
in-flight events. A break is: a type gone (renamed or removed), a routing key changed, a version
lowered, a version raised without an upcaster chain from the old one, a personal-data marker
removed or its subject changed (at any version), or, at the same version, a field removed,
retyped, no longer nullable, or newly required. Additions pass. Details: ``docs/catalog.md``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["check"]


def check(baseline: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per break of ``current`` against ``baseline`` (both catalogs); empty if none."""
    before = {e["type"]: e for e in baseline.get("events", [])}
    now = {e["type"]: e for e in current.get("events", [])}
    by_class = {e["class"]: e["type"] for e in now.values()}
    breaks: list[str] = []
    for name, old in before.items():
        new = now.get(name)
        if new is None:
            renamed = by_class.get(old.get("class", ""))
            if renamed is not None and renamed not in before:
                breaks.append(
                    f"{name}: type renamed to {renamed!r} ({old['class']}); stored events of "
                    f"{name!r} can no longer be read"
                )
            else:
                breaks.append(
                    f"{name}: type removed; stored events of {name!r} can no longer be read"
                )
            continue
        breaks += _event_breaks(name, old, new)
    return breaks


def _event_breaks(name: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    breaks = []
    if old["routing_key"] != new["routing_key"]:
        breaks.append(
            f"{name}: routing key changed from {old['routing_key']!r} to {new['routing_key']!r} "
            "(bindings and subscribers of the old key no longer get it)"
        )
    breaks += _personal_breaks(name, old, new)
    v_old, v_new = old["version"], new["version"]
    if v_new < v_old:
        breaks.append(f"{name}: version lowered from {v_old} to {v_new}")
        return breaks
    if v_new > v_old:
        missing = [v for v in range(v_old, v_new) if v not in set(new["upcasters"])]
        for v in missing:
            breaks.append(
                f"{name}: version raised from {v_old} to {v_new} without an upcaster "
                f"from version {v} to {v + 1}"
            )
        return breaks  # the upcasters bring old payloads to the new fields
    fields_old, fields_new = old["fields"], new["fields"]
    for field, was in fields_old.items():
        now = fields_new.get(field)
        if now is None:
            breaks.append(f"{name}: field {field!r} removed without a version bump and upcaster")
            continue
        if was["type"] != now["type"]:
            breaks.append(
                f"{name}: field {field!r} retyped from {was['type']} to {now['type']} "
                "without a version bump and upcaster"
            )
        elif was["schema"].get("format") != now["schema"].get("format"):
            breaks.append(
                f"{name}: field {field!r} format changed from {was['schema'].get('format')} "
                f"to {now['schema'].get('format')} without a version bump and upcaster"
            )
        if was["nullable"] and not now["nullable"]:
            breaks.append(
                f"{name}: field {field!r} no longer allows null without a version bump and upcaster"
            )
        if now["required"] and not was["required"]:
            breaks.append(
                f"{name}: field {field!r} made required without a version bump and upcaster"
            )
    for field, now in fields_new.items():
        if field not in fields_old and now["required"]:
            breaks.append(
                f"{name}: new field {field!r} is required (stored events lack it); give it a "
                "default, or bump the version with an upcaster"
            )
    return breaks


def _personal_breaks(name: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Personal-data markers, compared by field name at any version (an upcaster does not
    change how a value is stored). A marker removed: new values would be stored in plaintext
    (and, once no field is marked, the old tokens read back as literal strings). Its subject
    changed: new values are sealed under another subject's key, so forgetting the old subject
    no longer covers them. A placeholder changed or a marker added passes: the placeholder is
    applied on reading, never stored, and a plaintext value of a newly marked field reads as
    it is (only tokens are unsealed)."""
    breaks = []
    fields_new = new["fields"]
    for field, was in old["fields"].items():
        marker, now = was.get("personal"), fields_new.get(field)
        if not marker or now is None:
            continue
        if not now.get("personal"):
            breaks.append(
                f"{name}: personal-data marker removed from field {field!r} (new values would "
                "be stored in plaintext, and forgetting no longer covers them)"
            )
        elif now["personal"].get("subject") != marker.get("subject"):
            breaks.append(
                f"{name}: subject of personal field {field!r} changed from "
                f"{marker.get('subject')!r} to {now['personal'].get('subject')!r} (new values "
                "sealed under another subject's key: forgetting one no longer covers both)"
            )
    if breaks:
        return breaks
    was_marked = any(f.get("personal") for f in old["fields"].values())
    bumped = new["version"] > old["version"]  # (at the same version a removal is a break)
    if bumped and was_marked and not any(f.get("personal") for f in fields_new.values()):
        breaks.append(
            f"{name}: no personal-data field any more (stored tokens would read back as literal "
            "strings, and new values be stored in plaintext)"
        )
    return breaks
