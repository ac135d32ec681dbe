"""No silent stall: workers' heartbeats, queue depth and the oldest queued job per queue in
/readyz, the API's /metrics and `captioner status`; a stopped or killed worker shows there within
30 s (real worker processes, PostgreSQL and Redis)."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from datetime import timedelta

import pytest
from click.testing import CliRunner
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from captioner.api import create_app
from captioner.cli import cli
from captioner.core import liveness
from captioner.core.db import make_engine, make_sessionmaker
from captioner.core.queries import NewImage, submit
from captioner.core.settings import Settings, get_settings
from captioner.core.tables import Job, WebhookEvent, utcnow
from conftest import keyed, make_key

DETECTION_S = 30  # the bound: a stopped worker shows in /readyz and /metrics within it


def _sessions(url: str):
    return make_sessionmaker(make_engine(url))


def _queue(sessions, count: int, queue: str = "interactive") -> None:
    with sessions.begin() as s:
        images = [NewImage(f"file:///tmp/{queue}-{i}.jpg", f"sha256:{queue}{i}", None, 1) for i in range(count)]
        submit(s, images, "v1", queue)


def _samples(client, token: str = "t0ken") -> dict[tuple[str, tuple], float]:
    r = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.get_data(as_text=True)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.get_data(as_text=True)) for s in family.samples}


def test_a_worker_is_live_until_its_beats_age_out_or_it_leaves(sqlite_url):
    sessions = _sessions(sqlite_url)
    with sessions.begin() as s:
        liveness.beat(s, "celery@a", 11, ["interactive", "backfill"], "v1", "onnx")
        liveness.beat(s, "celery@b", 12, ["webhooks"], None, None)
        liveness.beat(s, "celery@a", 11, ["interactive", "backfill"], "v1", "onnx")  # a beat refreshes the row
    _queue(sessions, 3)
    with sessions() as s:
        now = utcnow()
        fresh = liveness.report(s, timeout_seconds=20)
        assert [w.live for w in fresh.workers] == [True, True]
        assert fresh.queues["interactive"].queued == 3 and fresh.queues["interactive"].workers == 1
        assert fresh.queues["backfill"] == liveness.QueueState(0, 0.0, 1)
        assert fresh.consumers("webhooks") == 1 and fresh.stalled() == []
        later = liveness.workers(s, 20, now + timedelta(seconds=21))  # no beat for 21 s: lost
        assert [w.live for w in later] == [False, False] and later[0].seconds_since_beat > 20
        assert liveness.queued(s, now + timedelta(seconds=60))["interactive"][1] >= 60
    with sessions.begin() as s:
        liveness.leave(s, "celery@a", 11)
    with sessions() as s:
        gone = liveness.report(s, timeout_seconds=20)
        assert [w.hostname for w in gone.workers] == ["celery@b"] and gone.stalled() == ["interactive"]
    with sessions.begin() as s:
        assert liveness.forget_lost(s, utcnow() + liveness.LOST_KEPT + timedelta(seconds=1)) == 1
        assert liveness.workers(s, 20) == []


def _pending_event(sessions, age_seconds: float) -> None:
    with sessions.begin() as s:
        s.add(WebhookEvent(event_id=f"ev-{age_seconds}", event="image.done", url="https://cms.example/hook", body="{}",
                           created_at=utcnow() - timedelta(seconds=age_seconds)))


def test_webhook_events_pending_with_no_live_delivery_worker_are_a_stall(sqlite_url):
    sessions = _sessions(sqlite_url)
    with sessions.begin() as s:
        liveness.beat(s, "celery@a", 11, ["interactive", "backfill"], "v1", "onnx")
    with sessions() as s:
        assert liveness.report(s, 20).webhooks == liveness.QueueState(0, 0.0, 0)
        assert liveness.report(s, 20).stalled() == []  # no event waiting: no delivery worker needed
    _pending_event(sessions, 90)
    _pending_event(sessions, 5)
    with sessions.begin() as s:
        delivered = WebhookEvent(event_id="ev-sent", event="image.done", url="https://cms.example/hook", body="{}",
                                 status="delivered", created_at=utcnow() - timedelta(seconds=900))
        s.add(delivered)
    with sessions() as s:
        state = liveness.report(s, 20)
        assert state.webhooks.queued == 2 and 90 <= state.webhooks.oldest_seconds < 120
        assert state.stalled() == ["webhooks"] and state.queue("webhooks") is state.webhooks
    with sessions.begin() as s:
        liveness.beat(s, "celery@hooks", 12, ["webhooks"], None, None)
    with sessions() as s:
        assert liveness.report(s, 20).stalled() == []  # a delivery worker retries them


def test_failures_by_code_count_the_last_hour_apart(sqlite_url):
    sessions = _sessions(sqlite_url)
    _queue(sessions, 3)
    with sessions.begin() as s:
        jobs = s.query(Job).order_by(Job.id).all()
        for job, code, age in zip(jobs, ["invalid_image", "invalid_image", "decode_timeout"], [10, 7200, 10]):
            job.status, job.error_code, job.finished_at = "failed", code, utcnow() - timedelta(seconds=age)
    with sessions() as s:
        assert liveness.failures(s) == {"invalid_image": liveness.Failures(2, 1),
                                        "decode_timeout": liveness.Failures(1, 1)}


def test_embedded_readiness_reports_queues_and_needs_no_worker(app_settings):
    _queue(_sessions(app_settings.database_url), 2)
    ready = create_app(app_settings).test_client().get("/readyz")
    assert ready.status_code == 200, ready.get_json()
    assert ready.get_json()["queues"]["interactive"]["queued"] == 2
    assert ready.get_json()["checks"]["workers"].startswith("not used (embedded mode")


def test_api_metrics_export_queues_workers_and_failures_from_the_database(app_settings):
    sessions = _sessions(app_settings.database_url)
    _queue(sessions, 2)
    _queue(sessions, 1, "backfill")
    with sessions.begin() as s:
        liveness.beat(s, "celery@a", 11, ["backfill"], "v1", "onnx")
        s.query(Job).filter(Job.queue == "backfill").update({"status": "failed", "error_code": "invalid_image"})
    client = keyed(create_app(replace(app_settings, metrics_token="t0ken")), make_key(app_settings.database_url))
    r = client.get("/metrics", headers={"Authorization": "Bearer t0ken"})
    assert r.headers["Content-Type"] == CONTENT_TYPE_LATEST and r.headers["Content-Type"].count("charset") == 1
    samples = _samples(client)
    assert samples[("captioner_jobs_queued", (("queue", "interactive"),))] == 2
    assert samples[("captioner_jobs_queued", (("queue", "backfill"),))] == 0
    assert samples[("captioner_jobs_oldest_queued_seconds", (("queue", "interactive"),))] >= 0
    assert samples[("captioner_workers_live", (("queue", "interactive"),))] == 0
    assert samples[("captioner_workers_live", (("queue", "backfill"),))] == 1
    assert samples[("captioner_workers_live", (("queue", "webhooks"),))] == 0
    assert samples[("captioner_jobs_failed", (("code", "invalid_image"),))] == 1
    assert samples[("captioner_webhook_events_pending", ())] == 0
    _pending_event(sessions, 30)
    samples = _samples(client)
    assert samples[("captioner_webhook_events_pending", ())] == 1
    assert samples[("captioner_webhook_events_oldest_pending_seconds", ())] >= 30
    assert not any("tenant" in dict(labels) for _, labels in samples)


def test_status_prints_queues_workers_and_failures(sqlite_url, monkeypatch):
    sessions = _sessions(sqlite_url)
    _queue(sessions, 2)
    _pending_event(sessions, 300)
    with sessions.begin() as s:
        liveness.beat(s, "celery@gpu1", 4242, ["backfill"], "349f304d4ac1", "torch")
    monkeypatch.setenv("CAPTIONER_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("CAPTIONER_BROKER_URL", "redis://127.0.0.1:1/0")  # never reached: status reads the database
    get_settings.cache_clear()
    try:
        text = CliRunner().invoke(cli, ["status"], catch_exceptions=False).output
        shown = CliRunner().invoke(cli, ["status", "--json"], catch_exceptions=False).output
    finally:
        get_settings.cache_clear()
    assert "interactive" in text and "stalled: no live worker consumes it" in text
    [webhooks] = [line for line in text.splitlines() if line.startswith("webhooks")]
    assert webhooks.split() == ["webhooks", "1", "5", "min", "0", "stalled:", "no", "live", "worker", "consumes", "it"]
    assert "live  celery@gpu1 pid 4242  backfill  model 349f304d4ac1 (torch)" in text
    report = json.loads(shown)
    assert report["queues"]["interactive"]["queued"] == 2 and report["stalled"] == ["interactive", "webhooks"]
    assert report["webhook_events"]["queued"] == 1 and report["embedded"] is False
    assert report["workers"][0]["hostname"] == "celery@gpu1" and report["workers"][0]["live"] is True

    monkeypatch.delenv("CAPTIONER_BROKER_URL")  # embedded: the same queue waits for the next caption run
    get_settings.cache_clear()
    try:
        text = CliRunner().invoke(cli, ["status"], catch_exceptions=False).output
        report = json.loads(CliRunner().invoke(cli, ["status", "--json"], catch_exceptions=False).output)
    finally:
        get_settings.cache_clear()
    [interactive] = [line for line in text.splitlines() if line.startswith("interactive")]
    assert interactive.endswith("waits for the next `captioner caption`") and "stalled" not in text
    assert report["embedded"] is True and report["stalled"] == [] and report["queues"]["interactive"]["queued"] == 2


@pytest.mark.integration  # starts worker processes
def test_a_stopped_or_killed_worker_shows_in_readyz_and_metrics_within_30_s(own_pg_url, redis_url, tiny_checkpoint,
                                                                             tmp_path):
    settings = Settings(database_url=own_pg_url, broker_url=redis_url, storage=str(tmp_path / "store"),
                        model_path=str(tiny_checkpoint), metrics_token="t0ken", rate_limit="100000/minute")
    env = {**os.environ, "CAPTIONER_DATABASE_URL": own_pg_url, "CAPTIONER_BROKER_URL": redis_url,
           "CAPTIONER_STORAGE": settings.storage, "CAPTIONER_MODEL_PATH": str(tiny_checkpoint)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    client = keyed(create_app(settings), make_key(own_pg_url))

    def start(log_name: str) -> subprocess.Popen:
        with open(tmp_path / log_name, "wb") as log:  # its own session: a kill reaches its pool too
            proc = subprocess.Popen([sys.executable, "-m", "captioner.cli", "worker", "--no-beat"], env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300  # a model load on a shared 2-core host
        while client.get("/readyz").get_json()["queues"]["interactive"]["workers"] != 1:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / log_name).read_text()[-3000:]
            time.sleep(0.5)
        return proc

    def seen_gone(proc: subprocess.Popen, how: signal.Signals) -> float:
        """Seconds from the signal until /readyz and /metrics both count no worker."""
        stopped = time.monotonic()
        os.killpg(proc.pid, how)
        while True:
            ready = client.get("/readyz")
            if (ready.get_json()["queues"]["interactive"]["workers"] == 0
                    and _samples(client)[("captioner_workers_live", (("queue", "interactive"),))] == 0):
                return time.monotonic() - stopped
            assert time.monotonic() - stopped < DETECTION_S, ready.get_json()
            time.sleep(0.5)

    worker = start("first.log")
    try:
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.get_json()["checks"]["workers"] == "ok: 1 live"
        assert _samples(client)[("captioner_workers_live", (("queue", "backfill"),))] == 1
        seen_gone(worker, signal.SIGTERM)  # warm shutdown: the worker deletes its row as it leaves
        assert worker.wait(timeout=60) == 0
    finally:
        worker.kill()
    _queue(_sessions(own_pg_url), 1)  # a job for a model version no worker runs: it stays queued
    stalled = client.get("/readyz")
    assert stalled.status_code == 503, stalled.get_json()
    assert stalled.get_json()["checks"]["workers"].startswith("error: no live worker consumes interactive (1 jobs")
    assert _samples(client)[("captioner_jobs_queued", (("queue", "interactive"),))] == 1

    worker = start("second.log")  # it takes the queued job
    try:
        seen_gone(worker, signal.SIGKILL)  # no goodbye: its row ages out (CAPTIONER_WORKER_TIMEOUT_SECONDS)
    finally:
        worker.wait(timeout=60)
    with _sessions(own_pg_url)() as s:
        assert [w.live for w in liveness.workers(s, settings.worker_timeout_seconds)] == [False]
