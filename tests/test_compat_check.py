"""``eventbus events --check BASELINE.json``: a baseline saved from one version of a module, the
check run against the next (each in a process of its own, as in CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

BASE = """
from typing import Annotated
from eventbus import Event, fields, personal, validate

class OrderPlaced(Event, type="shop.order_placed"):
    order_id: str
    total: int
    note: str | None = None
    customer_id: str = ""
    email: Annotated[str | None, personal("order_id", placeholder="?")] = None

class OrderShipped(Event, type="shop.order_shipped"):
    order_id: str
"""


def eventbus(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventbus", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def check(tmp_path: Path, changed: str) -> subprocess.CompletedProcess[str]:
    """The baseline of ``BASE``, then ``--check`` of ``changed`` against it."""
    module = tmp_path / "shop_events.py"
    module.write_text(textwrap.dedent(BASE))
    saved = eventbus(tmp_path, "events", "shop_events", "--json")
    assert saved.returncode == 0, saved.stderr
    (tmp_path / "baseline.json").write_text(saved.stdout)
    module.write_text(textwrap.dedent(changed))
    return eventbus(tmp_path, "events", "shop_events", "--check", "baseline.json")


def replaced(old: str, new: str) -> str:
    assert old in BASE
    return BASE.replace(old, new)


BREAKS = {
    "field removed": (
        replaced("    total: int\n", ""),
        ["shop.order_placed: field 'total' removed without a version bump and upcaster"],
    ),
    "field retyped": (
        replaced("    total: int\n", "    total: float\n"),
        [
            "shop.order_placed: field 'total' retyped from Integer to Float without a version "
            "bump and upcaster"
        ],
    ),
    "field made required": (
        replaced("note: str | None = None", "note: str"),
        [
            "shop.order_placed: field 'note' no longer allows null without a version bump and "
            "upcaster",
            "shop.order_placed: field 'note' made required without a version bump and upcaster",
        ],
    ),
    "new required field": (
        replaced("    total: int\n", "    total: int\n    currency: str\n"),
        [
            "shop.order_placed: new field 'currency' is required (stored events lack it); give "
            "it a default, or bump the version with an upcaster"
        ],
    ),
    "type renamed": (
        replaced('type="shop.order_shipped"', 'type="shop.order_dispatched"'),
        [
            "shop.order_shipped: type renamed to 'shop.order_dispatched' "
            "(shop_events.OrderShipped); stored events of 'shop.order_shipped' can no longer "
            "be read"
        ],
    ),
    "type removed": (
        BASE.split("class OrderShipped")[0],
        [
            "shop.order_shipped: type removed; stored events of 'shop.order_shipped' can no "
            "longer be read"
        ],
    ),
    "version bumped without an upcaster": (
        replaced('type="shop.order_placed"', 'type="shop.order_placed", version=3').replace(
            "    total: int\n", "    total: float\n"
        )
        + "\n@OrderPlaced.upcaster(2)\ndef up(p): return p\n",
        ["shop.order_placed: version raised from 1 to 3 without an upcaster from version 1 to 2"],
    ),
    "personal marker removed": (
        replaced('Annotated[str | None, personal("order_id", placeholder="?")]', "str | None"),
        [
            "shop.order_placed: personal-data marker removed from field 'email' (new values "
            "would be stored in plaintext, and forgetting no longer covers them)"
        ],
    ),
    "personal marker removed across a version bump": (
        replaced('Annotated[str | None, personal("order_id", placeholder="?")]', "str | None")
        .replace('type="shop.order_placed"', 'type="shop.order_placed", version=2')
        .replace("    total: int\n", "    total: float\n")
        + "\n@OrderPlaced.upcaster(1)\ndef up(p): return p\n",
        [
            "shop.order_placed: personal-data marker removed from field 'email' (new values "
            "would be stored in plaintext, and forgetting no longer covers them)"
        ],
    ),
    "personal field renamed unmarked across a version bump": (
        replaced(
            '    email: Annotated[str | None, personal("order_id", placeholder="?")]',
            "    mail: str | None",
        ).replace('type="shop.order_placed"', 'type="shop.order_placed", version=2')
        + "\n@OrderPlaced.upcaster(1)\ndef up(p):\n"
        "    p = dict(p); p['mail'] = p.pop('email', None); return p\n",
        [
            "shop.order_placed: no personal-data field any more (stored tokens would read back "
            "as literal strings, and new values be stored in plaintext)"
        ],
    ),
    "personal subject changed": (
        replaced(
            'personal("order_id", placeholder="?")', 'personal("customer_id", placeholder="?")'
        ),
        [
            "shop.order_placed: subject of personal field 'email' changed from 'order_id' to "
            "'customer_id' (new values sealed under another subject's key: forgetting one no "
            "longer covers both)"
        ],
    ),
    "routing key changed": (
        replaced('type="shop.order_shipped"', 'type="shop.order_shipped", routing_key="ship"'),
        [
            "shop.order_shipped: routing key changed from 'shop.order_shipped' to 'ship' "
            "(bindings and subscribers of the old key no longer get it)"
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_a_breaking_change_fails_naming_each_break(tmp_path: Path, case: str) -> None:
    changed, expected = BREAKS[case]
    result = check(tmp_path, changed)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout.splitlines() == expected
    assert f"{len(expected)} incompatible change(s) against baseline.json" in result.stderr


PASSES = {
    "unchanged": BASE,
    "new optional field and new type": replaced(
        "    note: str | None = None\n",
        "    note: str | None = None\n    coupon: str = ''\n",
    )
    + "\nclass OrderCancelled(Event, type='shop.order_cancelled'):\n    order_id: str\n",
    "version bump with upcasters": replaced(
        'type="shop.order_placed"', 'type="shop.order_placed", version=2'
    ).replace("    total: int\n", "    total_cents: int\n")
    + "\n@OrderPlaced.upcaster(1)\ndef up(p):\n"
    "    p = dict(p); p['total_cents'] = p.pop('total') * 100; return p\n",
    "personal marker added": replaced(
        "    note: str | None = None\n",
        '    note: Annotated[str | None, personal("order_id")] = None\n',
    ),
    "personal placeholder changed": replaced('placeholder="?"', 'placeholder="(gone)"'),
    "validator added on a kept field": replaced(
        "    order_id: str\n    total",
        "    order_id: Annotated[str, fields.Str(validate=validate.Length(max=64))]\n    total",
    ),
}


@pytest.mark.parametrize("case", sorted(PASSES))
def test_an_additive_change_passes(tmp_path: Path, case: str) -> None:
    result = check(tmp_path, PASSES[case])
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.startswith("compatible with baseline.json: ")


def test_the_added_types_are_counted(tmp_path: Path) -> None:
    result = check(tmp_path, PASSES["new optional field and new type"])
    assert result.stdout.strip() == "compatible with baseline.json: 3 event types, 1 new"


def test_a_file_that_is_not_a_catalog_is_exit_2(tmp_path: Path) -> None:
    (tmp_path / "shop_events.py").write_text(textwrap.dedent(BASE))
    (tmp_path / "baseline.json").write_text(json.dumps({"hello": 1}))
    result = eventbus(tmp_path, "events", "shop_events", "--check", "baseline.json")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "eventbus events: cannot use the baseline baseline.json: not a catalog "
        "(eventbus events --json)"
    )
