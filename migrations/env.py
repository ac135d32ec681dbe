"""Alembic environment: the metadata from core.tables, the URL from our settings (never Flask's)."""
from alembic import context

from captioner.core import tables  # registers the tables on Base.metadata
from captioner.core.db import Base, make_engine
from captioner.core.settings import get_settings

config = context.config
url = config.get_main_option("sqlalchemy.url") or get_settings().database_url


def include_name(name: str | None, _type: str, _parents: dict) -> bool:
    """The search index is the search module's, not core/tables.py's: comparing skips it."""
    return name not in tables.SEARCH_INDEX_NAMES


def run_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True,
                      include_name=include_name)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = make_engine(url)
    with engine.connect() as connection:
        # render_as_batch: SQLite cannot ALTER most things; batch mode rebuilds the table instead
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                          compare_type=True, include_name=include_name)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
