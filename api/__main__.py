"""``python -m api``: the ``sleuth`` command line (same as the console script)."""

from api.cli import app

app()
