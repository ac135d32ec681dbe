"""An operator's afternoon, end to end against real services (PostgreSQL, Redis, SeaweedFS, a
`captioner worker` and `captioner flower` started as the README starts them): a library prefix
with oddly named photos and bad files is captioned; the failures are found through the API with
their codes; Flower shows the backfill's per-image outcome; the broken photo is replaced and
retried until everything is done; then the worker stops, and /readyz and /metrics say so."""
import ast
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from captioner.api import create_app
from captioner.core import storage
from captioner.core.settings import Settings
from conftest import keyed, make_key  # a sibling: tests/ is on sys.path

pytestmark = pytest.mark.integration  # starts a worker and Flower

AUTH = "ops:story-test-pass"
DEADLINE_S = 600  # a model load and 7 captions on a shared 2-core host
DETECTION_S = 30  # the bound for "no worker" to show


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flower(url: str) -> tuple[int, object]:
    request = urllib.request.Request(url)
    request.add_header("Authorization", "Basic " + base64.b64encode(AUTH.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None
    except urllib.error.URLError:  # not listening yet
        return 0, None


def _wait(what, check, logs, deadline_s: float = DEADLINE_S):
    deadline = time.monotonic() + deadline_s
    while not (found := check()):
        assert time.monotonic() < deadline, f"waited {deadline_s} s for {what}\n{logs()}"
        time.sleep(0.5)
    return found


def _metric(client, name: str, labels: dict[str, str]) -> float | None:
    text = client.get("/metrics", headers={"Authorization": "Bearer t0ken"}).get_data(as_text=True)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def test_an_operator_finds_the_failures_retries_them_and_sees_the_worker_go(own_pg_url, redis_url, s3, checkpoint,
                                                                             photos, tmp_path):
    bucket = s3["S3_TEST_BUCKET"]
    settings = Settings(database_url=own_pg_url, broker_url=redis_url, storage=f"s3://{bucket}/uploads",
                        model_path=str(checkpoint), metrics_token="t0ken", batch_size=8, batch_wait_ms=500,
                        rate_limit="100000/minute")
    client = keyed(create_app(settings), make_key(own_pg_url, buckets=(f"s3://{bucket}/story/",)))
    s3_client = storage.s3_client()
    odd_names = ["IMG_1.JPG", "b.jpeg", "c.MPO", "d.jfif", "noextension", "f.JPG.bak"]
    for name, photo in zip(odd_names, photos[120:]):
        s3_client.put_object(Bucket=bucket, Key=f"story/{name}", Body=photo.read_bytes())
    whole = photos[130].read_bytes()
    bad = {"notes.jpg": b"plain text, not a photo", "cut.jpg": whole[:2000], "empty.jpg": b""}
    for name, data in bad.items():
        s3_client.put_object(Bucket=bucket, Key=f"story/{name}", Body=data)

    env = {**os.environ, **s3, "CAPTIONER_DATABASE_URL": own_pg_url, "CAPTIONER_BROKER_URL": redis_url,
           "CAPTIONER_STORAGE": settings.storage, "CAPTIONER_MODEL_PATH": str(checkpoint),
           "CAPTIONER_BATCH_SIZE": "8", "CAPTIONER_BATCH_WAIT_MS": "500", "CAPTIONER_FLOWER_BASIC_AUTH": AUTH}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    flower_port = _port()
    base = f"http://127.0.0.1:{flower_port}"
    procs = {}
    for name, args in (("flower", ["flower", "--port", str(flower_port)]), ("worker", ["worker", "--no-beat"])):
        with open(tmp_path / f"{name}.log", "wb") as log:  # its own session: a signal reaches its pool too
            procs[name] = subprocess.Popen([sys.executable, "-m", "captioner.cli", *args], env=env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)

    def logs() -> str:
        return "\n".join((tmp_path / f"{n}.log").read_text()[-2500:] for n in procs)
    try:
        # the worker is up (its heartbeat) and Flower receives its events
        _wait("the worker's heartbeat", lambda: client.get("/readyz").get_json()["queues"]["backfill"]["workers"] == 1,
              logs)
        _wait("Flower to see the worker", lambda: (lambda s, body: s == 200 and any(body.values()))(
            *_flower(f"{base}/api/workers?status=true")), logs, 120)

        # 1. the prefix: every photo is taken whatever its name, the rest is named as skipped
        r = client.post("/v1/batches", json={"s3": {"bucket": bucket, "prefix": "story/"}})
        assert r.status_code == 202, r.get_json()
        created = r.get_json()
        assert created["total"] == len(odd_names) + 1  # the cut JPEG starts like one: its job will fail
        assert created["skipped"]["reasons"] == {"not_an_image": 1, "empty": 1}
        assert {k["key"] for k in created["skipped"]["keys"]} == {"story/notes.jpg", "story/empty.jpg"}
        batch = created["id"]

        def settled():
            counts = client.get(f"/v1/batches/{batch}").get_json()["counts"]
            return counts["queued"] == counts["processing"] == 0 and counts
        counts = _wait("the batch to settle", settled, logs)
        assert counts["done"] == len(odd_names) and counts["failed"] == 1, counts

        # 2. the failures, with their codes, through the API
        shown = client.get(f"/v1/batches/{batch}").get_json()
        assert shown["failures"] == {"invalid_image": 1}, shown
        [failed] = client.get(f"/v1/batches/{batch}/images?status=failed").get_json()["images"]
        assert failed["source"] == f"s3://{bucket}/story/cut.jpg" and failed["error"]["code"] == "invalid_image"
        done = client.get(f"/v1/batches/{batch}/images?status=done&limit=100").get_json()["images"]
        assert sorted(i["source"].rsplit("/", 1)[1] for i in done) == sorted(odd_names)

        # 3. Flower: the backfill's tasks succeeded, and their results name the failed image
        def backfill_tasks():
            status, tasks = _flower(f"{base}/api/tasks?taskname=captioner.caption")
            grouped = [t for t in (tasks or {}).values() if "image_ids" in (t["kwargs"] or "")]
            return status == 200 and grouped and all(t["state"] in ("SUCCESS", "FAILURE") for t in grouped) and grouped
        grouped = _wait("Flower to report the backfill", backfill_tasks, logs, 120)
        assert {t["state"] for t in grouped} == {"SUCCESS"}, [(t["state"], t["exception"]) for t in grouped]
        results = [ast.literal_eval(t["result"]) for t in grouped]
        assert sum(r["done"] for r in results) == len(odd_names)
        assert [i for r in results for i in r["failed_images"]] == [failed["id"]]
        assert {c: n for r in results for c, n in r["failed"].items()} == {"invalid_image": 1}

        # 4. the operator replaces the broken photo and retries the batch's failures: all done
        s3_client.put_object(Bucket=bucket, Key="story/cut.jpg", Body=whole)
        retried = client.post(f"/v1/batches/{batch}/retry", json={})
        assert retried.status_code == 202 and retried.get_json()["retried"] == 1, retried.get_json()
        counts = _wait("the retried image", lambda: (c := settled()) and c["done"] == len(odd_names) + 1 and c, logs)
        assert counts["failed"] == 0 and client.get(f"/v1/batches/{batch}").get_json()["failures"] == {}
        image = client.get(f"/v1/images/{failed['id']}").get_json()
        assert image["status"] == "done" and image["caption"]

        # 5. the worker stops: within 30 s /readyz and /metrics say no worker consumes the queues
        stopped = time.monotonic()
        os.killpg(procs["worker"].pid, signal.SIGTERM)
        _wait("the worker to be counted gone", lambda: client.get("/readyz").get_json()["queues"]["backfill"]["workers"] == 0
              and _metric(client, "captioner_workers_live", {"queue": "backfill"}) == 0, logs, DETECTION_S)
        assert time.monotonic() - stopped < DETECTION_S
        upload = client.post("/v1/images", data={"file": (photos[140].open("rb"), "after-hours.jpg")})
        assert upload.status_code == 202
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "no live worker consumes interactive" in ready.get_json()["checks"]["workers"]
        assert _metric(client, "captioner_jobs_queued", {"queue": "interactive"}) == 1
        assert _metric(client, "captioner_workers_live", {"queue": "interactive"}) == 0
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
