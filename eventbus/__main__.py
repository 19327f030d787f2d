"""``python -m eventbus`` runs the ``eventbus`` command."""

from eventbus.cli import main

main()
