"""Prometheus metrics and JSON logs, in process: the API's /metrics and the worker's stage metrics
observed on a real batch (SQLite, a local folder, the shipped model)."""
import json
import logging
from dataclasses import replace

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from captioner.api import create_app
from captioner.core.errors import ConfigError
from captioner.core.logs import JsonFormatter
from captioner.core.settings import Settings, load_settings
from conftest import keyed, make_key  # a sibling: tests/ is on sys.path


def _requests(client, route: str) -> float:
    r = client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200 and r.mimetype == "text/plain"
    for family in text_string_to_metric_families(r.get_data(as_text=True)):
        for sample in family.samples:
            if (sample.name == "captioner_http_requests_total" and sample.labels["route"] == route
                    and sample.labels["status"] == "200"):
                return sample.value
    return 0.0


def test_metrics_count_requests_by_route_behind_a_bearer_token(app_settings):
    client = keyed(create_app(replace(app_settings, metrics_token="s3cret")), make_key(app_settings.database_url))
    before = _requests(client, "/v1/images/<id:image_id>")
    assert client.get("/v1/images/1").status_code == 404  # counted under its route, status 404
    assert client.get("/healthz").status_code == 200
    first = _requests(client, "/healthz")
    client.get("/healthz")
    client.get("/healthz")
    assert _requests(client, "/healthz") == first + 2
    assert _requests(client, "/v1/images/<id:image_id>") == before  # the 404 has its own status label
    text = client.get("/metrics", headers={"Authorization": "Bearer s3cret"}).get_data(as_text=True)
    assert 'captioner_http_request_seconds_bucket{le="0.005",method="GET",route="/healthz"}' in text

    wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.get_json()["error"]["code"] == "unauthorized"
    assert wrong.headers["WWW-Authenticate"] == "Bearer"
    assert client.get("/metrics").status_code == 401


def test_metrics_are_not_served_without_a_token(client):
    r = client.get("/metrics")
    assert r.status_code == 404 and "CAPTIONER_METRICS_TOKEN" in r.get_json()["error"]["message"]


def test_log_format_setting():
    assert load_settings({"CAPTIONER_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(ConfigError, match="LOG_FORMAT"):
        load_settings({"CAPTIONER_LOG_FORMAT": "xml"})
    with pytest.raises(ConfigError, match="user:password"):
        load_settings({"CAPTIONER_FLOWER_BASIC_AUTH": "admin"})


def _value(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_a_batch_observes_every_stage_and_logs_json_with_its_ids(sqlite_url, tmp_path, checkpoint, photos, caplog):
    from captioner.core import captioner, jobs, queries
    from captioner.core.db import make_engine, make_sessionmaker
    from captioner.worker import metrics

    settings = Settings(database_url=sqlite_url, storage=str(tmp_path / "store"), model_path=str(checkpoint),
                        batch_size=8)
    sm = make_sessionmaker(make_engine(sqlite_url))
    version = captioner.version(settings)
    uploads = [p.read_bytes() for p in photos[:3]] + [photos[3].read_bytes()[:3000]]  # the last one is cut off
    for data in uploads:
        jobs.submit_upload(sm, settings, data, version, "interactive", lambda _: None)
    stages = ("fetch", "decode", "model", "write")
    before = {s: _value("captioner_stage_seconds_count", {"stage": s}) for s in stages}
    captioned, batches = _value("captioner_images_captioned_total"), _value("captioner_batch_size_count")
    invalid = _value("captioner_image_failures_total", {"code": "invalid_image"})
    with sm.begin() as s:
        claimed = queries.claim(s, version, settings.lease_seconds, 8)
    with caplog.at_level(logging.INFO, logger="captioner.core.jobs"):
        report = jobs.caption_claimed(sm, settings, claimed)
    metrics.observe(report)

    assert report.captioned == 3 and report.failed == 1
    assert sorted(report.outcomes.values()) == ["done", "done", "done", "invalid_image"]
    after = {s: _value("captioner_stage_seconds_count", {"stage": s}) for s in stages}
    assert [after[s] - before[s] for s in stages] == [4, 4, 1, 1]  # per image, per image, per batch, per batch
    assert _value("captioner_stage_seconds_sum", {"stage": "model"}) > 0
    assert _value("captioner_images_captioned_total") == captioned + 3
    assert _value("captioner_batch_size_count") == batches + 1
    assert _value("captioner_image_failures_total", {"code": "invalid_image"}) == invalid + 1

    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
    done = [line for line in lines if line["message"].endswith("captioned")]
    failed = [line for line in lines if line["level"] == "WARNING"]
    assert len(done) == 3 and len(failed) == 1
    ids = {c.job_id: c.image_id for c in claimed}
    for line in done + failed:
        assert ids[line["job_id"]] == line["image_id"] and line["batch_id"] == report.batch
    assert failed[0]["error_code"] == "invalid_image"
