"""Alembic environment and revisions; run them with `captioner db upgrade`."""
from argparse import Namespace
from pathlib import Path

from alembic import command, context, op
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, func, select, table
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import sessionmaker

from captioner.core.db import make_engine, make_sessionmaker, shown
from captioner.core.errors import ConfigError, Conflict

HERE = Path(__file__).parent


def alembic_config(database_url: str) -> Config:
    """An Alembic config built in code, so `captioner db upgrade` needs no alembic.ini on the path."""
    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


# revisions whose downgrade drops what people made, and nothing could make again: table -> what it holds
PRECIOUS = {"c3a4auth0001": {"api_keys": "every client's API key",
                             "tenant_buckets": "which S3 locations each tenant may read"},
            "d5e6alttext1": {"alt_text_decisions": "people's alt-text decisions"}}


def downgrade(database_url: str, revision: str, force: bool = False) -> None:
    """Undo migrations down to `revision`. Refused before anything changes while a table it would
    drop holds rows (PRECIOUS), unless forced."""
    config = alembic_config(database_url)
    config.cmd_opts = Namespace(x=["force=1"] if force else [])  # what `alembic -x force=1` sets
    if not force:
        engine = make_engine(database_url)
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_heads()
            undone = [r.revision for r in ScriptDirectory.from_config(config).iterate_revisions(current, revision)]
            for rev in undone:
                for name, what in PRECIOUS.get(rev, {}).items():
                    _refuse_if_rows(connection, name, what)
        engine.dispose()
    command.downgrade(config, revision)


def refuse_to_drop(revision: str) -> None:
    """In `revision`'s downgrade, before its tables are dropped: the same refusal for a downgrade
    run by `alembic` itself, which checks one revision at a time."""
    if context.get_x_argument(as_dictionary=True).get("force") != "1":
        for name, what in PRECIOUS[revision].items():
            _refuse_if_rows(op.get_bind(), name, what)


def _refuse_if_rows(connection: Connection, name: str, what: str) -> None:
    rows = connection.execute(select(func.count()).select_from(table(name))).scalar_one()
    if rows:
        raise Conflict(f"this downgrade drops the {name} table and its {rows} rows ({what}); back the database "
                       "up, then run it again with --force (`captioner db downgrade REVISION --force`, or "
                       "`alembic -x force=1 downgrade REVISION`)", code="downgrade_refused")


def open_database(database_url: str) -> sessionmaker:
    """Sessions for the command line's database. A SQLite file (the embedded default) is created and
    migrated on first use, so a new user needs no set-up step; PostgreSQL is migrated once per
    deployment, by `captioner db upgrade`, and one that cannot be reached or is not migrated is
    refused here, with what to do, rather than met later as a missing table."""
    if database_url.startswith("sqlite"):
        upgrade(database_url)
        return make_sessionmaker(make_engine(database_url))
    engine = make_engine(database_url)
    require_migrated(engine, database_url)
    return make_sessionmaker(engine)


def require_migrated(engine: Engine, database_url: str) -> None:
    """ConfigError unless the database is at this captioner's head revision. One migrated by a newer
    captioner (a revision this one does not know) passes: its schema only adds to ours."""
    script = ScriptDirectory.from_config(alembic_config(database_url))
    try:
        with engine.connect() as connection:
            current = set(MigrationContext.configure(connection).get_current_heads())
    except OperationalError as e:
        reason = str(e.orig or e).strip().splitlines()[0]
        raise ConfigError(f"cannot reach the database {shown(database_url)}: {reason}") from e
    heads = set(script.get_heads())
    known = {r.revision for r in script.walk_revisions()}
    if current == heads or not current <= known:
        return
    state = "not migrated" if not current else f"at revision {', '.join(sorted(current))}"
    raise ConfigError(f"the database {shown(database_url)} is {state}, this captioner needs revision "
                      f"{', '.join(sorted(heads))}: run `captioner db upgrade`")
