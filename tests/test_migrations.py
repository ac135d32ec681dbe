"""Migrations are the only way the schema changes: they must build exactly what core/tables.py says."""
import pytest
from alembic import command
from click.testing import CliRunner

from captioner.cli import cli
from captioner.core.settings import get_settings
from captioner.migrations import alembic_config


@pytest.mark.parametrize("database", ["sqlite_url", "pg_url"])
def test_migrations_match_the_tables(database, request):
    command.check(alembic_config(request.getfixturevalue(database)))  # raises on any difference


def test_db_upgrade_command(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    monkeypatch.setenv("CAPTIONER_DATABASE_URL", url)
    get_settings.cache_clear()
    try:
        for _ in range(2):  # a second upgrade is a no-op
            result = CliRunner().invoke(cli, ["db", "upgrade"])
            assert result.exit_code == 0 and f"database at head: {url}" in result.output, result.output
    finally:
        get_settings.cache_clear()
    command.check(alembic_config(url))
