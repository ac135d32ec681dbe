"""The `captioner` command: click groups whose commands parse their options, call one function of
core/, model/, worker/ or bench/, and print. Nothing imports this package."""
import click

from . import admin, bench, model, pipeline, servers


@click.group()
def cli() -> None:
    """Caption photos: train and evaluate the model, run the pipeline, search the results."""


for _module in (model, pipeline, servers, admin, bench):
    for _command in _module.COMMANDS:
        cli.add_command(_command)
