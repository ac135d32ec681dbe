"""`captioner recaption` with the real model (embedded mode, SQLite): images captioned by an older
model get a new caption beside the old one, the newest is served, people's alt text stays."""
from click.testing import CliRunner
from sqlalchemy import func, select

from captioner.api import create_app
from captioner.core import alttext, captioner, jobs, queries
from captioner.cli import cli
from captioner.core.db import make_engine, make_sessionmaker
from captioner.core.queries import Result
from captioner.core.settings import Settings, get_settings
from captioner.core.tables import Caption
from conftest import keyed, make_key  # a sibling: tests/ is on sys.path

OLD = "oldmodel0001"


def run(args, env, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(cli, ["recaption", *args], catch_exceptions=False)
    finally:
        get_settings.cache_clear()


def test_recaption_adds_the_new_models_captions_and_keeps_decisions(sqlite_url, tmp_path, checkpoint, photos,
                                                                    monkeypatch):
    settings = Settings(database_url=sqlite_url, storage=str(tmp_path / "store"), model_path=str(checkpoint),
                        batch_size=4)
    sm = make_sessionmaker(make_engine(sqlite_url))
    _, old = jobs.submit_images(sm, [jobs.file_image(p) for p in photos[:3]], OLD, "backfill", lambda _: None)
    _, never = jobs.submit_images(sm, [jobs.file_image(photos[3])], OLD, "backfill", lambda _: None)
    with sm.begin() as s:  # the old model captioned three photos; the fourth never got its turn
        claimed = queries.claim(s, OLD, 60, 3, job_ids=[x.job_id for x in old])
        queries.complete(s, [Result(c, "an old caption", "An old caption.", [("an old caption", 0.9)], [], 0.9,
                                    False, 1, 1) for c in claimed], [], OLD, forward_size=3)
        alttext.decide(s, old[0].image_id, "edited", "My own words.", "key:editor")
    env = {"CAPTIONER_DATABASE_URL": sqlite_url, "CAPTIONER_STORAGE": settings.storage,
           "CAPTIONER_MODEL_PATH": settings.model_path, "CAPTIONER_BATCH_SIZE": "4"}

    assert "nothing to re-caption" in run(["--from-version", "someothermodel"], env, monkeypatch).output
    result = run([], env, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "3 images queued" in result.output and "3 done, 0 failed" in result.output

    version = captioner.version(settings)
    with sm() as s:
        per_version = dict(s.execute(select(Caption.model_version, func.count()).group_by(Caption.model_version)).all())
    assert per_version == {OLD: 3, version: 3}  # beside the old ones, not over them
    client = keyed(create_app(settings), make_key(settings.database_url))
    decided = client.get(f"/v1/images/{old[0].image_id}").get_json()
    assert decided["model_version"] == version and decided["caption"] != "an old caption"
    assert (decided["alt_text"], decided["alt_text_state"]) == ("My own words.", "edited")
    assert decided["alt_text_suggestion"]["model_version"] == version
    other = client.get(f"/v1/images/{old[1].image_id}").get_json()
    assert other["alt_text"] == other["alt_text_suggestion"]["text"] != "An old caption."
    assert [h["model_version"] for h in other["alt_text_history"]] == [OLD, version]

    # done already: a second run finds nothing; --all also takes the image the old model never captioned
    assert "nothing to re-caption" in run([], env, monkeypatch).output
    everything = run(["--all"], env, monkeypatch)
    assert "1 images queued" in everything.output and "1 done" in everything.output
    assert client.get(f"/v1/images/{never[0].image_id}").get_json()["status"] == "done"


def test_recaption_reaches_the_tenant_it_is_given(sqlite_url, tmp_path, checkpoint, photos, monkeypatch):
    """Found by the audit: `captioner recaption` only ever reached the default tenant."""
    sm = make_sessionmaker(make_engine(sqlite_url))
    _, [acme] = jobs.submit_images(sm, [jobs.file_image(photos[0])], OLD, "backfill", lambda _: None, tenant="acme")
    with sm.begin() as s:
        [claimed] = queries.claim(s, OLD, 60, 1, job_ids=[acme.job_id])
        queries.complete(s, [Result(claimed, "old", "Old.", [("old", 0.9)], [], 0.9, False, 1, 1)], [], OLD,
                         forward_size=1)
    env = {"CAPTIONER_DATABASE_URL": sqlite_url, "CAPTIONER_STORAGE": str(tmp_path / "store"),
           "CAPTIONER_MODEL_PATH": str(checkpoint), "CAPTIONER_BATCH_SIZE": "4"}
    assert "nothing to re-caption" in run([], env, monkeypatch).output  # the default tenant has no images
    result = run(["--tenant", "acme"], env, monkeypatch)
    assert "1 images queued" in result.output and "1 done, 0 failed" in result.output
