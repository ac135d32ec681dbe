"""The distributed path end to end on real services: the Flask API (test client) stores uploads in
SeaweedFS S3 and publishes to Redis; a real `captioner worker` process batches, captions and
writes to PostgreSQL."""
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select, update

from captioner.api import create_app
from conftest import keyed, make_key
from captioner.core import storage
from captioner.core.db import make_engine
from captioner.core.queue import CAPTION_TASK, create_celery
from captioner.core.settings import Settings
from captioner.core.tables import Caption, Job

pytestmark = pytest.mark.integration  # starts workers

UPLOADS, PREFIX_KEYS = 20, 100
BATCH_SIZE, BATCH_WAIT_MS = 16, 1500
DEADLINE_S = 420  # 120 captions on a shared 2-core CPU, with room to spare


@pytest.fixture(scope="module")
def settings(pg_url, redis_url, s3, checkpoint) -> Settings:
    # the test polls 21 routes a second: far above the default rate limit of one key
    return Settings(database_url=pg_url, broker_url=redis_url, storage=f"s3://{s3['S3_TEST_BUCKET']}/uploads",
                    model_path=str(checkpoint), batch_size=BATCH_SIZE, batch_wait_ms=BATCH_WAIT_MS,
                    rate_limit="100000/minute")


@pytest.fixture(scope="module")
def worker_process(settings, s3, tmp_path_factory):
    """`captioner worker` as an operator starts it, configured through the environment only."""
    env = {**os.environ, **s3, "CAPTIONER_DATABASE_URL": settings.database_url,
           "CAPTIONER_BROKER_URL": settings.broker_url, "CAPTIONER_STORAGE": settings.storage,
           "CAPTIONER_MODEL_PATH": settings.model_path, "CAPTIONER_BATCH_SIZE": str(BATCH_SIZE),
           "CAPTIONER_BATCH_WAIT_MS": str(BATCH_WAIT_MS)}
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "captioner.cli", "worker", "--no-beat"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    yield proc, log_path
    proc.terminate()  # warm shutdown: the batch in hand finishes, then the process exits
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def task_events(settings):
    """Counts of Celery events (task events of the caption task only), as Flower would receive them."""
    seen: Counter = Counter()
    app = create_celery(settings)
    conn = app.connection_for_read()

    def count(event: dict) -> None:
        if event.get("name", CAPTION_TASK) == CAPTION_TASK:  # task-succeeded events carry no name
            seen[event["type"]] += 1

    # one long capture: with Redis, events are pub/sub and a gap between captures would lose some
    receiver = app.events.Receiver(conn, handlers={"*": count})
    thread = threading.Thread(target=lambda: receiver.capture(limit=None, timeout=None, wakeup=False), daemon=True)
    thread.start()
    yield seen
    receiver.should_stop = True
    thread.join(5)
    conn.release()


def test_uploads_and_an_s3_prefix_are_captioned_in_batches(settings, s3, photos, task_events, worker_process):
    proc, log_path = worker_process
    bucket = s3["S3_TEST_BUCKET"]
    library = photos[UPLOADS:UPLOADS + PREFIX_KEYS]
    with ThreadPoolExecutor(8) as pool:  # a photo library already sitting in S3
        list(pool.map(lambda p: storage.s3_client().put_object(Bucket=bucket, Key=f"library/{p.name}",
                                                                Body=p.read_bytes()), library))

    deadline = time.monotonic() + 60
    while not (task_events["worker-online"] or task_events["worker-heartbeat"]):  # the worker is up
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.2)

    client = keyed(create_app(settings), make_key(settings.database_url, buckets=(f"s3://{bucket}/library/",)))
    started = time.monotonic()
    upload_ids = []
    for photo in photos[:UPLOADS]:
        r = client.post("/v1/images", data={"file": (io.BytesIO(photo.read_bytes()), photo.name)})
        assert r.status_code == 202, r.get_json()
        upload_ids.append(r.get_json()["id"])
    r = client.post("/v1/batches", json={"s3": {"bucket": bucket, "prefix": "library/"}})
    assert r.status_code == 202, r.get_json()
    batch = r.get_json()
    assert batch["total"] == PREFIX_KEYS

    while True:
        counts = client.get(f"/v1/batches/{batch['id']}").get_json()["counts"]
        uploads = [client.get(f"/v1/images/{i}").get_json() for i in upload_ids]
        if counts["done"] == PREFIX_KEYS and all(u["status"] == "done" for u in uploads):
            break
        assert proc.poll() is None, f"the worker exited: {log_path.read_text()[-3000:]}"
        assert time.monotonic() - started < DEADLINE_S, f"not done: {counts}; log: {log_path.read_text()[-3000:]}"
        time.sleep(1)
    elapsed = time.monotonic() - started

    image = uploads[0]
    assert image["caption"] and image["alt_text"] and image["model_version"]
    assert image["candidates"][0]["text"] and isinstance(image["candidates"][0]["score"], float)
    assert all(set(t) == {"label", "score"} for t in image["tags"])
    assert image["error"] is None and image["width"] > 0

    # the same S3 objects listed again: same ETags, same jobs, nothing to redo
    listed = [{"s3": {"bucket": bucket, "key": f"library/{p.name}"}} for p in library[:3]]
    r = client.post("/v1/batches", json={"images": listed + listed[:1]})
    assert r.status_code == 202 and r.get_json()["total"] == 3
    assert client.get(r.get_json()["url"]).get_json()["counts"]["done"] == 3
    missing = client.post("/v1/batches", json={"images": [{"s3": {"bucket": bucket, "key": "library/nope.jpg"}}]})
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "source_not_found"

    engine = make_engine(settings.database_url)
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Caption)) == UPLOADS + PREFIX_KEYS
        assert conn.scalar(select(func.count()).where(Job.status != "done")) == 0
        sizes = [n for (n,) in conn.execute(select(Caption.forward_size))]
    engine.dispose()
    # the worker saw batches, not single images; its log says the same
    logged = [int(n) for n in re.findall(r"(\d+) captioned in forwards", log_path.read_text())]
    assert logged and sum(logged) >= UPLOADS + PREFIX_KEYS
    assert max(sizes) > 1 and sum(sizes) / len(sizes) > 4, sorted(sizes)
    # batched requests are visible to monitoring like any other task (events are per request)
    deadline = time.monotonic() + 10
    # an upload has a message of its own; a prefix's jobs share one per batch of ids
    messages = UPLOADS + -(-PREFIX_KEYS // BATCH_SIZE)
    while task_events["task-succeeded"] < messages and time.monotonic() < deadline:
        time.sleep(0.2)
    for kind in ("task-sent", "task-received", "task-started", "task-succeeded"):
        assert task_events[kind] >= messages, dict(task_events)
    print(f"\ndistributed: {UPLOADS + PREFIX_KEYS} captions in {elapsed:.1f}s "
          f"({(UPLOADS + PREFIX_KEYS) / elapsed:.1f}/s); captioned per batch {logged}")


def test_cli_with_a_broker_hands_local_files_to_the_workers(settings, s3, photos, worker_process, tmp_path,
                                                            monkeypatch):
    from click.testing import CliRunner

    from captioner.cli import cli
    from captioner.core.settings import get_settings

    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in photos[150:160]:
        (folder / photo.name).symlink_to(photo)
    for key, value in {"CAPTIONER_DATABASE_URL": settings.database_url, "CAPTIONER_BROKER_URL": settings.broker_url,
                       "CAPTIONER_STORAGE": settings.storage, "CAPTIONER_MODEL_PATH": settings.model_path}.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["caption", str(folder), "--wait", "--write-metadata", "sidecar"],
                                    catch_exceptions=False)
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    batch_id = int(re.search(r"batch (\d+): 10 images submitted to the workers", result.output).group(1))
    assert "10 images: 10 done (10 captioned now, 0 already), 0 failed, 0 left" in result.output
    # the local files get their sidecars, found by their bytes although the workers read a copy
    assert "metadata: 10 sidecar" in result.output
    assert all((folder / f"{p.name}.xmp").is_file() for p in photos[150:160])
    # the workers read the bytes from S3, where the CLI put them, not from this machine's disk
    engine = make_engine(settings.database_url)
    with engine.connect() as conn:
        uris = conn.exec_driver_sql(
            "SELECT i.uri FROM images i JOIN batch_images b ON b.image_id = i.id WHERE b.batch_id = %s",
            (batch_id,)).scalars().all()
    engine.dispose()
    assert len(uris) == 10 and all(u.startswith(settings.storage + "/sha256/") for u in uris)


def test_the_sweep_recovers_a_job_whose_message_was_lost(settings, s3, photos, worker_process):
    """A job committed but never published (broker flushed, publisher crashed): the sweep task
    publishes it again and the worker captions it."""
    from datetime import timedelta

    from captioner.core import captioner, queries
    from captioner.core.db import make_sessionmaker
    from captioner.core.tables import utcnow

    data = photos[190].read_bytes()
    uri, digest = storage.store(settings.storage, data)
    engine = make_engine(settings.database_url)
    sm = make_sessionmaker(engine)
    with sm.begin() as s:
        [sub] = queries.submit(s, [queries.NewImage(uri, f"sha256:{digest}", digest, len(data))],
                               captioner.version(settings), "interactive")
        s.execute(update(Job).where(Job.id == sub.job_id).values(updated_at=utcnow() - timedelta(hours=1)))
    env = {**os.environ, **s3, "CAPTIONER_DATABASE_URL": settings.database_url,
           "CAPTIONER_BROKER_URL": settings.broker_url, "CAPTIONER_MODEL_PATH": settings.model_path}
    swept = subprocess.run([sys.executable, "-c", "from captioner.worker.tasks import sweep; print(sweep())"], env=env,
                           capture_output=True, text=True, check=True)
    assert swept.stdout.strip() == "1"
    deadline = time.monotonic() + DEADLINE_S
    while True:
        with sm() as s:
            if s.get(Job, sub.job_id).status == "done":
                break
        assert time.monotonic() < deadline
        time.sleep(0.5)
    engine.dispose()


def test_a_batch_with_write_metadata_gets_xmp_sidecars_beside_its_s3_objects(settings, s3, photos, worker_process,
                                                                              tmp_path):
    proc, log_path = worker_process
    bucket = s3["S3_TEST_BUCKET"]
    for p in photos[-3:]:
        storage.s3_client().put_object(Bucket=bucket, Key=f"xmp/{p.name}", Body=p.read_bytes())
    client = keyed(create_app(settings), make_key(settings.database_url, buckets=(f"s3://{bucket}/xmp/",)))
    assert client.post("/v1/batches", json={"s3": {"bucket": bucket, "prefix": "xmp/"},
                                            "write_metadata": "embed"}).status_code == 400  # S3: sidecars only
    r = client.post("/v1/batches", json={"s3": {"bucket": bucket, "prefix": "xmp/"}, "write_metadata": "sidecar"})
    assert r.status_code == 202, r.get_json()
    keys = [f"xmp/{p.name}.xmp" for p in photos[-3:]]
    deadline = time.monotonic() + DEADLINE_S
    while not all(storage.exists(f"s3://{bucket}/{k}") for k in keys):  # written right after the captions
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(1)
    engine = make_engine(settings.database_url)
    with engine.connect() as conn:
        captions = set(conn.scalars(select(Caption.text)))
    engine.dispose()
    for key in keys:
        local = tmp_path / key.replace("/", "_")
        local.write_bytes(storage.read(f"s3://{bucket}/{key}", 1 << 20))
        out = subprocess.run(["exiftool", "-j", "-XMP-dc:Description", str(local)], capture_output=True, text=True)
        assert json.loads(out.stdout)[0]["Description"] in captions
