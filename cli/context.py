"""What every command needs at its boundary: the settings, the database, the data folder, and our
errors turned into click's `Error: ...` with exit code 1."""
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click
from sqlalchemy.orm import sessionmaker

from captioner.core.errors import CaptioningError, ConfigError
from captioner.core.settings import Settings, get_settings
from captioner.migrations import open_database


def settings() -> Settings:
    try:
        return get_settings()
    except ConfigError as e:
        raise click.ClickException(str(e))


def database(config: Settings) -> sessionmaker:
    return open_database(config.database_url)


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
