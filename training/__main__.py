"""`python -m headstart ...`: the `headstart` command."""

from headstart.cli import run

run()
