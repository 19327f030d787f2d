"""``eventbus demo``: run the image-upload example (examples/image_upload) end to end."""

from __future__ import annotations

import importlib
import os
import sys

import click


@click.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    default=None,
    help="Keep the database and media here (new or empty); default: a temporary directory.",
)
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for services.")
@click.option("--verbose", is_flag=True, help="Show the services' log lines.")
def demo(directory: str | None, timeout: float, verbose: bool) -> None:
    """Run the image-upload example end to end, embedded: no server needed.

    Run it from the root of a source checkout after pip install -e '.[demo]': a fresh SQLite
    file, the memory:// bus, the upload service and four services in this process, the bundled
    sample images uploaded over HTTP, then an account of what each service did and a summary.
    The example lives in examples/image_upload/ (see its README), not in the installed package.
    """
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module("examples.image_upload.demo")
    except ModuleNotFoundError as exc:
        if exc.name == "PIL":
            click.echo("eventbus demo needs Pillow: pip install -e '.[demo]'", err=True)
            sys.exit(1)
        if exc.name in ("examples", "examples.image_upload", "examples.image_upload.demo"):
            click.echo(
                f"eventbus demo: there is no examples/image_upload in {os.getcwd()}. The demo "
                "comes with the source, not with the installed package: run it from the root "
                "of an eventbus checkout (where pyproject.toml is).",
                err=True,
            )
            sys.exit(2)
        raise
    argv = ["--timeout", str(timeout)]
    argv += ["--dir", directory] if directory else []
    argv += ["--verbose"] if verbose else []
    sys.exit(module.main(argv))
