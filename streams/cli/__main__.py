"""``python -m streams.cli`` runs the ``lightmem`` command line."""

from streams.cli import app

app()
