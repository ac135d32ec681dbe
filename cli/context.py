"""What every command needs at its boundary: the settings, the database, the data folder, and our
errors turned into click's `Error: ...` with exit code 1."""
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import click
from sqlalchemy.orm import sessionmaker

from captioner.core.errors import CaptioningError, ConfigError
from captioner.core.settings import RUNTIMES, Settings, get_settings
from captioner.migrations import open_database


def settings() -> Settings:
    try:
        return get_settings()
    except ConfigError as e:
        raise click.ClickException(str(e))


def database(config: Settings) -> sessionmaker:
    try:
        return open_database(config.database_url)
    except ConfigError as e:
        raise click.ClickException(f"{e.code}: {e.message}")


@contextmanager
def reported() -> Iterator[None]:
    """Our errors as `Error: code: message`, not a traceback."""
    try:
        yield
    except CaptioningError as e:
        raise click.ClickException(f"{e.code}: {e.message}")


def data_path(given: str | None, relative: str, option: str) -> Path:
    """An option's path, else `relative` under CAPTIONER_DATA_DIR; an error that says which to set."""
    if given is not None:
        return Path(given)
    folder = settings().data_dir
    if folder is None:
        raise click.UsageError(f"pass {option} or set CAPTIONER_DATA_DIR to the folder that holds {relative}")
    path = Path(folder) / relative
    if not path.exists():
        raise click.UsageError(f"{path} does not exist (CAPTIONER_DATA_DIR={folder}); pass {option}")
    return path


def runtime_option(command):
    """--runtime, shared by every command that captions: overrides CAPTIONER_RUNTIME."""
    return click.option("--runtime", type=click.Choice(RUNTIMES), default=None,
                        help="What runs the model [$CAPTIONER_RUNTIME, default auto: ONNX Runtime on a CPU, torch on a GPU].")(command)


def with_runtime(config: Settings, runtime: str | None) -> Settings:
    return replace(config, runtime=runtime) if runtime else config


def runtimes(text: str) -> list[str]:
    """A comma-separated list of runtimes, checked."""
    names = [r.strip() for r in text.split(",") if r.strip()]
    wrong = [r for r in names if r not in RUNTIMES]
    if not names or wrong:
        raise click.BadParameter(f"runtimes are {', '.join(RUNTIMES)}, got {text!r}", param_hint="--runtime")
    return names


def load_model(config: Settings, checkpoint: str | None, device: str | None = None, runtime: str | None = None):
    """The captioner for a command: `checkpoint` (default: the configured or shipped one) in the
    settings' runtime unless given; a model that cannot load is a click error, not a traceback."""
    from captioner.core import captioner

    with reported():
        try:
            return captioner.load(config, Path(checkpoint) if checkpoint else captioner.checkpoint_path(config),
                                  device, runtime)
        except (ValueError, FileNotFoundError) as e:
            raise click.ClickException(str(e))
