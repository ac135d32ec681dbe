"""Alembic environment and revisions; run them with `captioner db upgrade`."""
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.orm import sessionmaker

from captioner.core.db import make_engine, make_sessionmaker

HERE = Path(__file__).parent


def alembic_config(database_url: str) -> Config:
    """An Alembic config built in code, so `captioner db upgrade` needs no alembic.ini on the path."""
    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def open_database(database_url: str) -> sessionmaker:
    """Sessions for the command line's database. A SQLite file (the embedded default) is created and
    migrated on first use, so a new user needs no set-up step; PostgreSQL is migrated once per
    deployment, by `captioner db upgrade`."""
    if database_url.startswith("sqlite"):
        upgrade(database_url)
    return make_sessionmaker(make_engine(database_url))
