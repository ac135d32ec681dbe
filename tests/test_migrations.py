"""Migrations are the only way the schema changes: they must build exactly what core/tables.py says."""
from urllib.parse import urlsplit, urlunsplit

import pytest
from alembic import command
from click.testing import CliRunner

from captioner.cli import cli
from captioner.core.errors import Conflict
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


def _with_password(url: str) -> str:
    """The URL with a password in it (the test server trusts local connections, so any one works)."""
    parts = urlsplit(url)
    user = parts.username or "postgres"
    return urlunsplit(parts._replace(netloc=f"{user}:{PASSWORD}@{parts.hostname}:{parts.port or 5432}"))


PASSWORD = "s3cret-Pa55word"


def test_commands_never_print_the_database_password(pg_url, tmp_path, tiny_checkpoint, monkeypatch):
    """`db upgrade` and the `caption` summary name the database, with the password masked."""
    url = _with_password(pg_url)
    for key, value in {"CAPTIONER_DATABASE_URL": url, "CAPTIONER_MODEL_PATH": str(tiny_checkpoint),
                       "CAPTIONER_STORAGE": str(tmp_path / "store")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("CAPTIONER_BROKER_URL", raising=False)
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    get_settings.cache_clear()
    try:
        for args in (["db", "upgrade"], ["caption", str(folder)]):
            result = CliRunner().invoke(cli, args)
            assert result.exit_code == 0, result.output
            assert PASSWORD not in result.output and ":***@" in result.output, result.output
    finally:
        get_settings.cache_clear()


# own_pg_url: this module's own database, as the session's shared one must stay at head
@pytest.mark.parametrize("database", ["sqlite_url", "own_pg_url"])
def test_downgrades_that_drop_keys_or_decisions_are_refused_unless_forced(database, request):
    from captioner.core import auth
    from captioner.core.db import make_engine, make_sessionmaker
    from captioner.migrations import downgrade, upgrade

    url = request.getfixturevalue(database)
    engine = make_engine(url)
    with make_sessionmaker(engine).begin() as s:
        auth.create_key(s, "acme", "write")
    engine.dispose()
    for revision in ("5c12d53081cc", "b1d2search01"):  # below the keys' migration, and the alt text's
        with pytest.raises(Conflict, match="api_keys table and its 1 rows"):
            downgrade(url, revision)
    command.check(alembic_config(url))  # refused before anything changed: still at head
    if database == "sqlite_url":  # alembic's own command, one revision at a time (on PostgreSQL it would stop
        with pytest.raises(Conflict, match="api_keys"):  # after f9a0tenantid's index drop, committed on its own)
            command.downgrade(alembic_config(url), "5c12d53081cc")
        upgrade(url)
    env = {"CAPTIONER_DATABASE_URL": url}
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["db", "downgrade", "5c12d53081cc"], env=env)
        assert result.exit_code == 1 and "downgrade_refused" in result.output and "--force" in result.output
        result = CliRunner().invoke(cli, ["db", "downgrade", "5c12d53081cc", "--force"], env=env)
        assert result.exit_code == 0, result.output
    finally:
        get_settings.cache_clear()
    upgrade(url)


@pytest.mark.parametrize("database", ["sqlite_url", "own_pg_url"])
def test_caption_quality_upgrades_to_null_and_downgrades_keeping_the_captions_and_their_search(database, request):
    from alembic.script import ScriptDirectory
    from sqlalchemy import inspect, select

    from captioner.core import queries, search
    from captioner.core.db import make_engine, make_sessionmaker
    from captioner.core.tables import Caption
    from captioner.migrations import downgrade, upgrade

    url = request.getfixturevalue(database)
    below = ScriptDirectory.from_config(alembic_config(url)).get_revision("c3d4quality1").down_revision

    def caption(sm, key: str, text: str, quality: float | None) -> int:
        with sm.begin() as s:
            [sub] = queries.submit(s, [queries.NewImage(f"file:///{key}.jpg", f"sha256:{key}")], "v1", "backfill")
            claimed = queries.Claimed(sub.job_id, sub.image_id, f"file:///{key}.jpg", 1)
            queries.complete(s, [queries.Result(claimed, text, text, [], [], 0.5, False, 8, 8, quality=quality)],
                             [], "v1", forward_size=1)
        return sub.image_id

    engine = make_engine(url)
    sm = make_sessionmaker(engine)
    estimated = caption(sm, "quality-1", "A zebra crosses a river.", 0.9)
    with sm() as s:
        assert s.scalar(select(Caption.quality).where(Caption.image_id == estimated)) == 0.9
    engine.dispose()

    downgrade(url, below)
    engine = make_engine(url)
    assert "quality" not in {c["name"] for c in inspect(engine).get_columns("captions")}
    engine.dispose()

    upgrade(url)
    command.check(alembic_config(url))
    engine = make_engine(url)
    sm = make_sessionmaker(engine)
    later = caption(sm, "quality-2", "An okapi stands in a forest.", None)
    with sm() as s:
        qualities = dict(s.execute(select(Caption.image_id, Caption.quality)
                                   .where(Caption.image_id.in_([estimated, later]))).all())
        # the index survives both ways (SQLite's is kept by triggers a table copy would have dropped)
        found = [[r["id"] for r in search.query_index(s, word, 10, 0, "default")] for word in ("zebra", "okapi")]
    engine.dispose()
    assert qualities == {estimated: None, later: None}  # a row from before the column has no estimate
    assert found == [[estimated], [later]]


def test_commands_refuse_a_postgresql_database_that_is_not_at_head_or_not_reachable(own_pg_url):
    """Not a missing-table traceback half-way through: the command stops first and says what to do."""
    from alembic.script import ScriptDirectory

    from captioner.migrations import downgrade, upgrade

    script = ScriptDirectory.from_config(alembic_config(own_pg_url))
    [head] = script.get_heads()
    below = script.get_revision(head).down_revision

    def search(url: str):
        get_settings.cache_clear()
        try:
            return CliRunner().invoke(cli, ["search", "--json", "dog"], env={"CAPTIONER_DATABASE_URL": url})
        finally:
            get_settings.cache_clear()

    assert search(own_pg_url).exit_code == 0
    try:
        downgrade(own_pg_url, below)
        result = search(own_pg_url)
        assert result.exit_code == 1 and f"is at revision {below}" in result.output, result.output
        assert f"needs revision {head}: run `captioner db upgrade`" in result.output
        downgrade(own_pg_url, "base", force=True)
        result = search(own_pg_url)
        assert result.exit_code == 1 and "is not migrated" in result.output and "captioner db upgrade" in result.output
    finally:
        upgrade(own_pg_url)
    assert search(own_pg_url).exit_code == 0
    unreachable = urlunsplit(urlsplit(_with_password(own_pg_url))._replace(netloc=f"postgres:{PASSWORD}@127.0.0.1:1"))
    result = search(unreachable)
    assert result.exit_code == 1 and "cannot reach the database" in result.output, result.output
    assert PASSWORD not in result.output and ":***@127.0.0.1:1" in result.output
