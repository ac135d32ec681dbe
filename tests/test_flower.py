"""Monitoring a real deployment: a `captioner worker` and `captioner flower` as operators start
them (environment only). Flower must list every image's task with its true state although the
worker captions them in batches; the worker serves Prometheus metrics and logs JSON lines."""
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from captioner.api import create_app
from captioner.core.settings import Settings
from conftest import keyed, make_key  # a sibling: tests/ is on sys.path

pytestmark = pytest.mark.integration  # starts Flower and a worker

AUTH = "ops:flower-test-pass"
PHOTOS, BATCH_SIZE = 6, 4
DEADLINE_S = 600  # 7 captions and a model load on a shared 2-core CPU under heavy load took 6 min


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, auth: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except urllib.error.URLError:  # not listening yet
        return 0, b""


def _start(args: list[str], env: dict[str, str], log_path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "captioner.cli", *args], env=env, stdout=log, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def deployment(own_pg_url, redis_url, checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("monitoring")
    settings = Settings(database_url=own_pg_url, broker_url=redis_url, storage=str(root / "store"),
                        model_path=str(checkpoint), batch_size=BATCH_SIZE, batch_wait_ms=500)
    flower_port, metrics_port = _port(), _port()
    env = {**os.environ, "CAPTIONER_DATABASE_URL": own_pg_url, "CAPTIONER_BROKER_URL": redis_url,
           "CAPTIONER_STORAGE": settings.storage, "CAPTIONER_MODEL_PATH": str(checkpoint),
           "CAPTIONER_BATCH_SIZE": str(BATCH_SIZE), "CAPTIONER_BATCH_WAIT_MS": "500", "CAPTIONER_LOG_FORMAT": "json",
           "CAPTIONER_WORKER_METRICS_PORT": str(metrics_port), "CAPTIONER_FLOWER_BASIC_AUTH": AUTH}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["TMPDIR"] = str(root / "tmp")  # where the worker keeps its pool's metric samples while it runs
    (root / "tmp").mkdir()
    flower = _start(["flower", "--port", str(flower_port)], env, root / "flower.log")
    worker = _start(["worker", "--no-beat"], env, root / "worker.log")
    base = f"http://127.0.0.1:{flower_port}"
    logs = lambda: (root / "flower.log").read_text()[-2000:] + (root / "worker.log").read_text()[-2000:]  # noqa: E731
    try:
        deadline = time.monotonic() + 120
        # Flower has the worker's heartbeat: its event receiver is connected and sees every task from now on
        while True:
            status, body = _get(f"{base}/api/workers?status=true", AUTH)
            if status == 200 and any(json.loads(body).values()):
                break
            assert flower.poll() is None and worker.poll() is None, logs()
            assert time.monotonic() < deadline, logs()
            time.sleep(0.5)
        yield settings, base, f"http://127.0.0.1:{metrics_port}/metrics", root / "worker.log"
    finally:  # also when the setup failed: a stray worker would take the next run's tasks
        _stop(worker)
        _stop(flower)
    assert not list((root / "tmp").glob("captioner-metrics-*")), "the stopped worker left its metric samples"


def test_flower_shows_each_image_task_succeeded_or_failed(deployment, photos):
    settings, base, _, log_path = deployment
    client = keyed(create_app(settings), make_key(settings.database_url))
    ids = []
    uploads = [p.read_bytes() for p in photos[40:40 + PHOTOS]] + [photos[50].read_bytes()[:3000]]  # one cut off
    for data in uploads:
        r = client.post("/v1/images", data={"file": (io.BytesIO(data), "photo.jpg")})
        assert r.status_code == 202, r.get_json()
        ids.append(r.get_json()["id"])
    deadline = time.monotonic() + DEADLINE_S
    while True:
        status, body = _get(f"{base}/api/tasks?taskname=captioner.caption", AUTH)
        assert status == 200
        tasks = json.loads(body)
        states = [t["state"] for t in tasks.values()]
        if states.count("SUCCESS") + states.count("FAILURE") == len(uploads):
            break
        assert time.monotonic() < deadline, (states, log_path.read_text()[-3000:])
        time.sleep(1)

    assert sorted(states) == ["FAILURE"] + ["SUCCESS"] * PHOTOS, [(t["state"], t["exception"]) for t in tasks.values()]
    by_image = {json.loads(t["kwargs"].replace("'", '"'))["image_id"]: t for t in tasks.values()}
    for image_id in ids[:-1]:
        assert client.get(f"/v1/images/{image_id}").get_json()["status"] == "done"
    for task in tasks.values():
        # received when buffered, started when its batch went to the pool, then its outcome
        assert task["received"] and task["started"] and task["received"] <= task["started"]
        assert task["runtime"] > 0 and task["worker"]
    [failed] = [t for t in tasks.values() if t["state"] == "FAILURE"]
    assert failed["exception"] == "invalid_image"
    assert client.get(f"/v1/images/{ids[-1]}").get_json()["error"]["code"] == "invalid_image"
    assert all(t["result"] == "'done'" for t in tasks.values() if t["state"] == "SUCCESS")
    assert set(by_image) == set(ids)  # Flower names each task's image by its id, as the API does


def test_flower_refuses_requests_without_credentials(deployment):
    _, base, _, _ = deployment
    assert _get(f"{base}/api/tasks")[0] == 401
    assert _get(f"{base}/api/tasks", "ops:wrong")[0] == 401
    assert _get(f"{base}/api/workers", AUTH)[0] == 200


def test_worker_serves_metrics_of_its_pool_and_logs_json(deployment):
    _, _, metrics_url, log_path = deployment  # runs after the captioning test: its batches are counted
    status, body = _get(metrics_url)
    assert status == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body.decode()) for s in family.samples}
    assert samples[("captioner_images_captioned_total", ())] >= PHOTOS
    assert samples[("captioner_image_failures_total", (("code", "invalid_image"),))] >= 1
    for stage in ("fetch", "decode", "model", "write"):
        assert samples[("captioner_stage_seconds_count", (("stage", stage),))] >= 1
    assert samples[("captioner_batch_size_count", ())] >= 2  # 7 images in batches of at most 4
    assert samples[("captioner_queue_depth", (("queue", "interactive"),))] == 0

    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    # "ready." only once the pool child has loaded its model: the consumer starts after that
    messages = [line["message"] for line in lines]
    loaded = [i for i, m in enumerate(messages) if m.startswith("model loaded in 1 pool process after")]
    ready = [i for i, m in enumerate(messages) if m.endswith(" ready.")]
    child = [i for i, m in enumerate(messages) if m.startswith("model ") and " loaded: runtime " in m]
    assert child and loaded and ready and child[0] < loaded[0] < ready[0], messages[:20]
    captioned = [line for line in lines if line["message"].endswith(" captioned")]
    assert len(captioned) >= PHOTOS
    assert all(isinstance(line["image_id"], int) and isinstance(line["job_id"], int) and line["batch_id"]
               for line in captioned)


def test_flower_without_credentials_serves_its_pages_on_loopback_and_refuses_its_api(redis_url, tmp_path):
    """What the docs promise for `captioner flower` with no CAPTIONER_FLOWER_BASIC_AUTH."""
    port = _port()
    env = {**os.environ, "CAPTIONER_BROKER_URL": redis_url, "CAPTIONER_DATABASE_URL": f"sqlite:///{tmp_path / 'c.db'}"}
    for name in ("CAPTIONER_FLOWER_BASIC_AUTH", "FLOWER_BASIC_AUTH", "FLOWER_UNAUTHENTICATED_API"):
        env.pop(name, None)
    flower = _start(["flower", "--port", str(port)], env, tmp_path / "flower.log")
    try:
        deadline = time.monotonic() + 60
        while _get(f"http://127.0.0.1:{port}/healthcheck")[0] != 200:
            assert flower.poll() is None and time.monotonic() < deadline, (tmp_path / "flower.log").read_text()
            time.sleep(0.3)
        assert _get(f"http://127.0.0.1:{port}/workers")[0] == 200
        assert _get(f"http://127.0.0.1:{port}/api/workers")[0] == 401
    finally:
        _stop(flower)
    assert "its HTTP API (/api/*) answers 401 until CAPTIONER_FLOWER_BASIC_AUTH" in (tmp_path / "flower.log").read_text()
    refused = subprocess.run([sys.executable, "-m", "captioner.cli", "flower", "--host", "0.0.0.0"], env=env,
                             capture_output=True, text=True)
    assert refused.returncode == 1 and "set CAPTIONER_FLOWER_BASIC_AUTH=user:password to listen on 0.0.0.0" in refused.stderr


def test_a_backfill_task_reports_each_image_and_shows_while_it_runs(deployment, photos, tmp_path):
    """A backfill message rings for a group of images: its task succeeds with a count per outcome
    and the ids of the images that failed, shows image ids, and `celery inspect active` lists it
    while its batch runs."""
    import ast

    from captioner.core import captioner, jobs
    from captioner.core.queue import create_celery, publisher
    from captioner.migrations import open_database

    settings, base, _, log_path = deployment
    good = photos[80:96]
    bad = {"notes.jpg": b"plain text", "cut.jpg": photos[96].read_bytes()[:2000], "empty.jpg": b""}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    files = [*good[:5], *(tmp_path / n for n in bad), *good[5:]]
    sm = open_database(settings.database_url)
    _, submitted = jobs.submit_images(sm, [jobs.file_image(p) for p in files], captioner.version(settings),
                                      "backfill", publisher(settings), batch_source="flower backfill")
    bad_ids = {x.image_id for x in submitted[5:8]}
    inspect = create_celery(settings).control.inspect(timeout=0.5)
    active_seen: list[dict] = []
    deadline = time.monotonic() + DEADLINE_S
    while True:
        # safe: the kwargs as shown (kwargsrepr), not the job ids the message carries for the worker
        active_seen += [r for rs in (inspect.active(safe=True) or {}).values() for r in rs]
        status, body = _get(f"{base}/api/tasks?taskname=captioner.caption", AUTH)
        grouped = [t for t in json.loads(body).values() if "image_ids" in (t["kwargs"] or "")]
        if len(grouped) == -(-len(files) // BATCH_SIZE) and all(t["state"] in ("SUCCESS", "FAILURE") for t in grouped):
            break
        assert time.monotonic() < deadline, ([t["state"] for t in grouped], log_path.read_text()[-3000:])
        time.sleep(0.2)

    assert {t["state"] for t in grouped} == {"SUCCESS"}, [(t["state"], t["exception"]) for t in grouped]
    results = [ast.literal_eval(t["result"]) for t in grouped]
    assert sum(r["done"] for r in results) == len(good)
    assert {i for r in results for i in r["failed_images"]} == bad_ids
    assert sum(sum(r["failed"].values()) for r in results) == 3
    assert {code for r in results for code in r["failed"]} == {"invalid_image"}
    shown = {i for t in grouped for i in ast.literal_eval(t["kwargs"])["image_ids"]}
    assert shown == {x.image_id for x in submitted}  # image ids, what the API and the logs name
    running = [r for r in active_seen if r["name"] == "captioner.caption" and "image_ids" in str(r["kwargs"])]
    assert running, f"celery inspect active never listed a running batch: {active_seen}"
    assert all(r["worker_pid"] and r["time_start"] for r in running)
