"""Retrying failed jobs, for operators: the API's two routes, `captioner retry` and the web
interface's *Retry failed* button. A retry resets the attempt count, keeps the error history and
never reaches another tenant's jobs."""
import io
from dataclasses import replace

import pytest
from click.testing import CliRunner
from sqlalchemy import update
from conftest import csrf_token, keyed, make_key, signed_in  # siblings: tests/ is on sys.path
from test_api import assert_error, jpeg

from captioner.api import create_app
from captioner.cli import cli
from captioner.core import captioner, jobs
from captioner.core.db import make_engine, make_sessionmaker
from captioner.core.settings import Settings, get_settings
from captioner.core.tables import Job


def _fail(sm, job_ids, code="too_many_attempts") -> None:
    with sm.begin() as s:
        s.execute(update(Job).where(Job.id.in_(job_ids)).values(
            status="failed", attempts=3, error_code=code, error_message=f"{code} for the test"))


@pytest.fixture
def setup(app_settings):
    sm = make_sessionmaker(make_engine(app_settings.database_url))
    app = create_app(app_settings)
    app.config["TESTING"] = True
    return app, sm, make_key(app_settings.database_url, "acme"), make_key(app_settings.database_url, "other")


def test_an_image_is_retried_by_its_tenant_only(setup):
    app, sm, acme_key, other_key = setup
    acme, other = keyed(app, acme_key), keyed(app, other_key)
    data = jpeg()
    first = acme.post("/v1/images", data={"file": (io.BytesIO(data), "a.jpg")}).get_json()
    _fail(sm, [first["id"]])
    with sm() as s:
        job_id = s.query(Job.id).filter(Job.image_id == first["id"]).scalar()
    # the same bytes again: the failed job comes back, and this is how it is queued again
    again = acme.post("/v1/images", data={"file": (io.BytesIO(data), "a.jpg")})
    assert again.get_json()["id"] == first["id"] and again.get_json()["status"] == "failed"
    assert_error(other.post(f"/v1/images/{first['id']}/retry"), 404, "not_found")
    r = acme.post(f"/v1/images/{first['id']}/retry")
    assert r.status_code == 202 and r.get_json()["status"] == "queued" and r.get_json()["error"] is None
    with sm() as s:
        job = s.get(Job, job_id)
        assert job.attempts == 0 and job.error_code is None
        assert [(h["code"], h["attempts"]) for h in job.error_history] == [("too_many_attempts", 3)]
    assert_error(acme.post(f"/v1/images/{first['id']}/retry"), 409, "not_failed")


def test_a_batch_is_retried_by_error_code(setup, app_settings):
    app, sm, acme_key, other_key = setup
    acme, other = keyed(app, acme_key), keyed(app, other_key)
    images = []
    for color in [(10, 20, 30), (40, 50, 60), (70, 80, 90)]:
        images.append(jobs.stored_upload(app_settings, jpeg(color)))
    batch_id, subs = jobs.submit_images(sm, images, captioner.version(app_settings), "backfill", lambda _: None,
                                        batch_source="three", tenant="acme")
    _fail(sm, [subs[0].job_id, subs[1].job_id])
    _fail(sm, [subs[2].job_id], "invalid_image")
    assert_error(other.post(f"/v1/batches/{batch_id}/retry"), 404, "not_found")
    assert_error(acme.post(f"/v1/batches/{batch_id}/retry", json={"error": 5}), 400, "invalid_request")
    r = acme.post(f"/v1/batches/{batch_id}/retry", json={"error": "too_many_attempts"})
    assert r.status_code == 202 and r.get_json()["retried"] == 2
    counts = acme.get(f"/v1/batches/{batch_id}").get_json()["counts"]
    assert (counts["queued"], counts["failed"]) == (2, 1)
    assert acme.post(f"/v1/batches/{batch_id}/retry").get_json()["retried"] == 1  # no body: every failed job

    # the web interface's button, behind the same CSRF check as every form
    _fail(sm, [s.job_id for s in subs])
    browser = signed_in(app, acme_key)
    assert "Retry failed (3)" in browser.get(f"/batches/{batch_id}").get_data(as_text=True)
    assert browser.post(f"/batches/{batch_id}/retry").status_code == 400  # no CSRF token
    token = csrf_token(browser, f"/batches/{batch_id}")
    assert browser.post(f"/batches/{batch_id}/retry", data={"csrf_token": token}).status_code == 303
    assert acme.get(f"/v1/batches/{batch_id}").get_json()["counts"]["queued"] == 3
    other_browser = signed_in(app, other_key)
    token = csrf_token(other_browser, "/upload")
    assert other_browser.post(f"/batches/{batch_id}/retry", data={"csrf_token": token}).status_code == 404


def test_captioner_retry_after_too_many_attempts(sqlite_url, tmp_path, checkpoint, photos, monkeypatch):
    """Found by the audit: a job failed `too_many_attempts` (three worker deaths) stayed failed
    forever. `captioner retry` queues it again, and in embedded mode captions it."""
    settings = Settings(database_url=sqlite_url, storage=str(tmp_path / "store"), model_path=str(checkpoint),
                        batch_size=4)
    sm = make_sessionmaker(make_engine(sqlite_url))
    version = captioner.version(settings)
    _, subs = jobs.submit_images(sm, [jobs.file_image(p) for p in photos[:2]], version, "backfill", lambda _: None,
                                 tenant="acme")
    _, [theirs] = jobs.submit_images(sm, [jobs.file_image(photos[2])], version, "backfill", lambda _: None)
    _fail(sm, [s.job_id for s in subs] + [theirs.job_id])
    for name, value in {"DATABASE_URL": sqlite_url, "STORAGE": settings.storage, "MODEL_PATH": str(checkpoint),
                        "BATCH_SIZE": "4"}.items():
        monkeypatch.setenv(f"CAPTIONER_{name}", value)
    monkeypatch.delenv("CAPTIONER_BROKER_URL", raising=False)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["retry", "--tenant", "acme", "--error", "too_many_attempts"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "2 failed jobs queued again" in result.output and "2 done, 0 failed" in result.output
    with sm() as s:
        assert [s.get(Job, x.job_id).status for x in subs] == ["done", "done"]
        assert s.get(Job, theirs.job_id).status == "failed"  # the default tenant's job was not touched
        assert s.get(Job, subs[0].job_id).error_history[0]["code"] == "too_many_attempts"
