"""The `captioner` command: click groups whose commands parse their options, call one function of
core/, model/, worker/ or bench/, and print. Nothing imports this package."""
import click

from . import admin, batches, bench, metadata, model, pipeline, servers

# the base install has none of these: which extra brings each (pyproject.toml)
EXTRA_OF = {"torch": "worker", "torchvision": "worker", "timm": "worker", "celery_batches": "worker",
            "obstore": "worker", "flask": "api", "flask_limiter": "api", "flask_wtf": "api", "flower": "api",
            "pycocoevalcap": "train", "matplotlib": "train"}


class Commands(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as e:
            top = (e.name or "").partition(".")[0]
            if top not in EXTRA_OF:
                raise
            raise click.ClickException(f"this command needs {top}, which this installation lacks: "
                                       f"pip install 'captioner[{EXTRA_OF[top]}]'") from None


@click.group(cls=Commands)
def cli() -> None:
    """Caption photos: train and evaluate the model, run the pipeline, search the results."""


for _module in (model, pipeline, batches, metadata, servers, admin, bench):
    for _command in _module.COMMANDS:
        cli.add_command(_command)
