"""The package's shape (docs/architecture.md): layers import only downwards, modules stay small,
the public API stays small and typed."""

from __future__ import annotations

import ast
import pathlib
import warnings

import pytest

import eventbus

PACKAGE = pathlib.Path(eventbus.__file__).parent

# Bottom to top: a module may import its own layer and the layers below it, never above.
# The command line and the package's top (its API, 0.1's paths) are one layer.
LAYERS = ["base", "events", "store", "subscribe", "bus", "ops", "run", "rpc", "cli", "top"]
LAYERS += ["testing"]  # tools for the users' tests and the pytest plugin: the top layer too
RANK = {name: LAYERS.index(name) for name in LAYERS}
RANK |= dict.fromkeys(["top", "testing"], LAYERS.index("cli"))
BASE = {"errors", "logging", "settings", "tracing"}  # imported by every layer, import none of them
TOP = {"__init__", "__main__", "_deprecated", "control", "metrics"}  # the API and 0.1's paths


def layer(module: str) -> str:
    """``eventbus.store.store`` -> ``store``; ``eventbus.errors`` -> ``base``."""
    parts = module.split(".")[1:]
    if not parts:
        return "top"
    if len(parts) == 1 and not (PACKAGE / parts[0]).is_dir():
        return "base" if parts[0] in BASE else "top"
    return parts[0]


def modules() -> list[tuple[str, pathlib.Path]]:
    """(dotted name, path) of every module; a package's ``__init__`` named as the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found.append((".".join(("eventbus", *parts)), path))
    return found


def imports(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("eventbus"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("eventbus"))
    return names


def test_every_module_knows_its_layer() -> None:
    unknown = {name for name, _ in modules() if layer(name) not in LAYERS}
    assert not unknown, f"modules outside the layers of docs/architecture.md: {sorted(unknown)}"


def test_layers_import_only_downwards() -> None:
    upward = []
    for name, path in modules():
        here = RANK[layer(name)]
        for target in imports(path):
            if RANK[layer(target)] > here:
                upward.append(f"{name} ({layer(name)}) imports {target} ({layer(target)})")
    assert not upward, "\n".join(upward)


def test_live_delivery_does_not_go_through_replay() -> None:
    for name in ("run/worker.py", "run/batch.py", "run/jobs.py", "run/settle.py"):
        assert "eventbus.subscribe.replay" not in imports(PACKAGE / name), name


def test_no_module_is_over_500_lines() -> None:
    long = {name: n for name, path in modules() if (n := len(path.read_text().splitlines())) > 500}
    assert not long, long


def test_only_the_store_touches_the_events_table() -> None:
    readers = [
        name
        for name, path in modules()
        if layer(name) != "store"
        and any(
            isinstance(node, ast.alias) and node.name == "events"
            for node in ast.walk(ast.parse(path.read_text()))
        )
        and "eventbus.store.tables" in imports(path)
    ]
    assert not readers, readers


def test_the_public_api_is_small_and_typed() -> None:
    assert len(eventbus.__all__) <= 25
    for name in eventbus.__all__:
        assert getattr(eventbus, name) is not None
    assert (PACKAGE / "py.typed").exists()
    exceptions = [n for n in eventbus.__all__ if n.endswith(("Error", "Timeout"))]
    assert exceptions == ["EventbusError"], "exceptions are imported from eventbus.errors"


def test_old_top_level_names_still_work_with_a_warning() -> None:
    from eventbus.errors import ConcurrencyError

    with pytest.warns(DeprecationWarning, match=r"eventbus\.errors\.ConcurrencyError"):
        assert eventbus.ConcurrencyError is ConcurrencyError  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
            _ = eventbus.NoSuchThing  # type: ignore[attr-defined]
