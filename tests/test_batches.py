"""Failures an operator can see and batches they can cancel, on both databases: real bad files (a
truncated JPEG, text named .jpg) captioned by the embedded pipeline fail with their code and
message, and the API (GET /v1/batches, /v1/batches/<id>, /v1/batches/<id>/images), the
`captioner batches` commands and the export show them; cancelling fails the queued jobs with the
code cancelled, which claims and the sweep then leave alone."""
import io
import json
from datetime import timedelta

import pytest
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import update

from captioner.api import create_app
from captioner.cli import cli
from captioner.core import batches, captioner, jobs, queries
from captioner.core.settings import Settings, get_settings
from captioner.core.tables import Job, utcnow
from conftest import keyed, make_key
from test_api import assert_error


def _truncated_jpeg() -> bytes:
    out = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(out, "JPEG")
    return out.getvalue()[:3000]


@pytest.fixture(scope="module")
def captioned(each_database, tiny_checkpoint, photos, tmp_path_factory):
    """`captioner caption FOLDER` (embedded: no broker) over three photos, a truncated JPEG and a
    text file named .jpg -> (database url, tiny checkpoint, the batch id)."""
    url, _ = each_database
    folder = tmp_path_factory.mktemp("photos")
    for photo in photos[:3]:
        (folder / photo.name).symlink_to(photo)
    (folder / "cut-short.jpg").write_bytes(_truncated_jpeg())
    (folder / "shopping-list.jpg").write_text("milk, eggs, bread\n")
    env = {"CAPTIONER_DATABASE_URL": url, "CAPTIONER_MODEL_PATH": str(tiny_checkpoint),
           "CAPTIONER_STORAGE": str(tmp_path_factory.mktemp("store"))}
    with pytest.MonkeyPatch.context() as mp:
        # the tiny model loads in this process: it must not stay the model later tests get
        mp.setattr(captioner, "_loaded", None)
        mp.delenv("CAPTIONER_BROKER_URL", raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        get_settings.cache_clear()
        try:
            result = CliRunner().invoke(cli, ["caption", str(folder)], catch_exceptions=False)
        finally:
            get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "5 images: 3 done" in result.output and "failed: 2 x invalid_image" in result.output, result.output
    with each_database[1]() as s:
        [batch] = batches.listing(s, "default", 100)
    return url, tiny_checkpoint, batch["id"]


@pytest.fixture(scope="module")
def api(captioned):
    url, checkpoint, _ = captioned
    app = create_app(Settings(database_url=url, model_path=str(checkpoint), storage="/nonexistent"))
    app.config["TESTING"] = True
    yield app
    app.extensions["captioner"].sessionmaker.kw["bind"].dispose()  # before the database is dropped


def _cli(url: str, *args: str) -> tuple[int, str]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAPTIONER_DATABASE_URL", url)
        get_settings.cache_clear()
        try:
            result = CliRunner().invoke(cli, list(args))
        finally:
            get_settings.cache_clear()
    return result.exit_code, result.output


def test_failed_images_are_listed_with_their_code_and_message(captioned, api):
    url, _, batch_id = captioned
    client = keyed(api, make_key(url))
    batch = client.get(f"/v1/batches/{batch_id}").get_json()
    assert batch["counts"] == {"queued": 0, "processing": 0, "done": 3, "failed": 2}
    assert batch["failures"] == {"invalid_image": 2}

    failed = client.get(f"/v1/batches/{batch_id}/images", query_string={"status": "failed"}).get_json()
    assert failed["next_offset"] is None and failed["status"] == "failed"
    by_source = {i["source"]: i for i in failed["images"]}
    assert set(by_source) == {"cut-short.jpg", "shopping-list.jpg"}  # the file names, not the server's folders
    assert by_source["cut-short.jpg"]["error"]["code"] == "invalid_image"
    assert "truncated" in by_source["cut-short.jpg"]["error"]["message"]
    assert by_source["shopping-list.jpg"]["error"]["message"]
    assert all(i["caption"] is None and i["status"] == "failed" for i in failed["images"])

    done = client.get(f"/v1/batches/{batch_id}/images?status=done").get_json()["images"]
    assert len(done) == 3 and all(i["caption"] and i["error"] is None for i in done)
    everything = client.get(f"/v1/batches/{batch_id}/images?limit=2").get_json()
    assert len(everything["images"]) == 2 and everything["next_offset"] == 2
    rest = client.get(f"/v1/batches/{batch_id}/images?limit=2&offset=4").get_json()
    assert len(rest["images"]) == 1 and rest["next_offset"] is None
    assert_error(client.get(f"/v1/batches/{batch_id}/images?status=lost"), 400, "invalid_request")

    listed = client.get("/v1/batches").get_json()
    assert [b["id"] for b in listed["batches"]] == [batch_id] and listed["next_offset"] is None
    assert listed["batches"][0]["counts"] == batch["counts"]
    assert listed["batches"][0]["url"] == f"/v1/batches/{batch_id}"


def test_the_batches_commands_show_the_failures(captioned):
    url, _, batch_id = captioned
    code, out = _cli(url, "batches", "list")
    assert code == 0 and f"{batch_id:>6}" in out and "3 done  2 failed" in out, out
    code, out = _cli(url, "batches", "show", str(batch_id))
    assert code == 0 and "5 images: 3 done, 2 failed" in out and "failed: 2 x invalid_image" in out, out
    assert "cut-short.jpg  invalid_image: " in out and "shopping-list.jpg  invalid_image: " in out
    code, out = _cli(url, "batches", "show", str(batch_id), "--json")
    shown = json.loads(out)
    assert shown["failures"] == {"invalid_image": 2} and len(shown["images"]) == 2
    code, out = _cli(url, "batches", "list", "--json")
    assert [json.loads(line)["id"] for line in out.splitlines()] == [batch_id]
    # another tenant sees nothing of it
    code, out = _cli(url, "batches", "show", str(batch_id), "--tenant", "other")
    assert code == 1 and f"not_found: no batch with id {batch_id}" in out
    assert _cli(url, "batches", "list", "--tenant", "other")[1] == "no batches\n"
    assert _cli(url, "batches", "cancel", str(batch_id), "--tenant", "other")[0] == 1


def test_the_export_has_the_failed_images_when_asked(captioned, api):
    url, _, _ = captioned
    client = keyed(api, make_key(url))
    default = [json.loads(line) for line in client.get("/v1/export").get_data(as_text=True).splitlines()]
    assert len(default) == 3 and all(r["state"] != "failed" and "error_code" not in r for r in default)
    rows = [json.loads(line) for line in
            client.get("/v1/export?include_failed=true").get_data(as_text=True).splitlines()]
    failed = [r for r in rows if r["state"] == "failed"]
    assert len(rows) == 5 and [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert {(r["key"].rsplit("/", 1)[-1], r["error_code"], r["caption"]) for r in failed} == {
        ("cut-short.jpg", "invalid_image", None), ("shopping-list.jpg", "invalid_image", None)}
    assert all(r["error_code"] is None and r["caption"] for r in rows if r["state"] != "failed")
    code, out = _cli(url, "export", "--format", "csv", "--include-failed")
    assert code == 0 and out.splitlines()[0].endswith(",error_code,error_message") and out.count(",failed,") == 2


@pytest.fixture
def queued_batch(each_database):
    """A batch of four images of a tenant of its own: one done, one being captioned, two queued."""
    url, sm = each_database
    tenant = f"cancel-{utcnow().timestamp()}"
    images = [queries.NewImage(f"s3://bucket/{tenant}/{n}.jpg", f"s3:{tenant}/{n}@e", None, 1) for n in range(4)]
    batch_id, submitted = jobs.submit_images(sm, images, "v1", "backfill", lambda _: None, batch_source="4 images",
                                             tenant=tenant)
    ids = [s.job_id for s in submitted]
    with sm.begin() as s:
        [done, processing] = queries.claim(s, "v1", 600, 2, job_ids=ids[:2])
        queries.mark_started(s, [processing.job_id])  # its forward runs: it shows as processing
        queries.complete(s, [queries.Result(done, "a dog", "A dog.", [("a dog", 0.9)], [], 0.9, False, 8, 8)], [],
                         "v1", 1)
    return url, sm, tenant, batch_id, ids, processing


def test_cancel_fails_the_queued_jobs_and_nothing_else(queued_batch):
    url, sm, tenant, batch_id, ids, processing = queued_batch
    app = create_app(Settings(database_url=url, model_path="/nonexistent", storage="/nonexistent"))
    client = keyed(app, make_key(url, tenant=tenant))
    r = client.post(f"/v1/batches/{batch_id}/cancel")
    assert r.status_code == 200 and r.get_json() == {"cancelled": 2, "url": f"/v1/batches/{batch_id}"}
    again = client.post(f"/v1/batches/{batch_id}/cancel")  # idempotent
    assert again.status_code == 200 and again.get_json()["cancelled"] == 0
    view = client.get(f"/v1/batches/{batch_id}").get_json()
    assert view["counts"] == {"queued": 0, "processing": 1, "done": 1, "failed": 2}
    assert view["failures"] == {"cancelled": 2}
    failed = client.get(f"/v1/batches/{batch_id}/images?status=failed").get_json()["images"]
    assert [(i["error"]["code"], i["error"]["message"]) for i in failed] == [
        ("cancelled", f"batch {batch_id} was cancelled")] * 2

    # another tenant's key, even an admin's: the batch does not exist for it, and nothing changes
    other = keyed(app, make_key(url, tenant="someone-else", scope="admin"))
    assert_error(other.post(f"/v1/batches/{batch_id}/cancel"), 404, "not_found")
    assert_error(other.get(f"/v1/batches/{batch_id}/images"), 404, "not_found")
    assert batch_id not in [b["id"] for b in other.get("/v1/batches").get_json()["batches"]]
    assert_error(keyed(app, make_key(url, tenant=tenant, scope="read")).post(f"/v1/batches/{batch_id}/cancel"),
                 403, "insufficient_scope")

    with sm.begin() as s:
        # a worker receiving a cancelled job's id (its message was published before) drops it
        assert queries.claim(s, "v1", 600, 10, job_ids=ids[2:]) == []
        # the sweep, even long after, publishes none of them again (their doorbells are gone too)
        s.execute(update(Job).where(Job.id.in_(ids[2:])).values(updated_at=utcnow() - timedelta(days=1)))
        assert not set(ids[2:]) & {job_id for job_id, _ in queries.sweep(s, 3, 60)}
        # the job being captioned when the batch was cancelled finishes normally
        queries.complete(s, [queries.Result(processing, "a cat", "A cat.", [("a cat", 0.9)], [], 0.9, False, 8, 8)],
                         [], "v1", 1)
    assert client.get(f"/v1/batches/{batch_id}").get_json()["counts"]["done"] == 2

    # retrying the cancelled ones resumes them
    r = client.post(f"/v1/batches/{batch_id}/retry", json={"error": "cancelled"})
    assert r.status_code == 202 and r.get_json()["retried"] == 2
    assert client.get(f"/v1/batches/{batch_id}").get_json()["counts"]["queued"] == 2
    app.extensions["captioner"].sessionmaker.kw["bind"].dispose()


def test_an_embedded_run_of_a_cancelled_batch_captions_nothing(queued_batch):
    """The embedded pipeline claims by batch: nothing of a cancelled batch is left to claim, so
    the run ends before loading the model (its path does not even exist)."""
    _, sm, tenant, batch_id, _, _ = queued_batch
    with sm.begin() as s:
        assert batches.cancel(s, batch_id, tenant) == 2
    reports = []
    jobs.run_embedded(sm, Settings(model_path="/nonexistent"), "v1", batch_id, reports.append)
    assert reports == []
