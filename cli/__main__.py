"""`python -m captioner.cli`: the same command as the `captioner` script."""
from . import cli

cli()
