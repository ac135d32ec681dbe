"""The HTTP API through Flask's test client, on SQLite and a local storage folder (no broker:
submissions stay queued). The full path with a broker and workers is in test_distributed.py."""
import io
import json
import socket
import subprocess
import sys
from pathlib import Path

from PIL import Image


def jpeg(color=(200, 30, 30), size=(320, 240)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "JPEG")
    return out.getvalue()


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code and body["error"]["message"]
    return body


def test_unknown_image_is_a_json_404(client):
    body = assert_error(client.get("/v1/images/424242"), 404, "not_found")
    assert "424242" in body["error"]["message"]


def test_unknown_batch_is_a_json_404(client):
    assert_error(client.get("/v1/batches/9"), 404, "not_found")


def test_unknown_route_and_method_use_the_same_shape(client):
    assert_error(client.get("/v1/nothing-here"), 404, "not_found")
    assert_error(client.delete("/v1/images/1"), 405, "method_not_allowed")


def test_malformed_json_is_a_json_400(client):
    assert_error(client.post("/v1/images", data=b"{not json", content_type="application/json"), 400,
                 "invalid_request")


def test_missing_fields_are_json_400s_that_name_the_field(client):
    body = assert_error(client.post("/v1/images", json={"s3": {"bucket": "b"}}), 400, "invalid_request")
    assert "s3.key" in body["error"]["message"]
    assert_error(client.post("/v1/images", json={"url": "http://x"}), 400, "invalid_request")
    assert_error(client.post("/v1/batches", json={"images": []}), 400, "invalid_request")
    body = assert_error(client.post("/v1/batches", json={"images": [{"s3": {"bucket": "b", "key": 3}}]}), 400,
                        "invalid_request")
    assert "images[0].s3.key" in body["error"]["message"]
    assert_error(client.post("/v1/images", data={"photo": (io.BytesIO(jpeg()), "a.jpg")}), 400, "invalid_request")
    assert_error(client.post("/v1/images", data={"file": (io.BytesIO(jpeg()), "a.jpg"), "queue": "urgent"}), 400,
                 "invalid_request")


def test_a_file_that_is_not_an_image_is_a_422(client):
    assert_error(client.post("/v1/images", data={"file": (io.BytesIO(b"hello"), "a.jpg")}), 422, "invalid_image")


def test_an_upload_over_the_limit_is_a_413(app_settings):
    from dataclasses import replace

    from api import create_app

    small = create_app(replace(app_settings, max_upload_bytes=1000)).test_client()
    assert_error(small.post("/v1/images", data={"file": (io.BytesIO(jpeg(size=(800, 600))), "a.jpg")}), 413,
                 "request_entity_too_large")


def test_upload_is_queued_stored_once_and_deduplicated(client, app_settings):
    first = client.post("/v1/images", data={"file": (io.BytesIO(jpeg()), "a.jpg")})
    assert first.status_code == 202
    body = first.get_json()
    assert body["status"] == "queued" and body["queue"] == "interactive"
    assert first.headers["Location"] == f"/v1/images/{body['id']}"
    again = client.post("/v1/images", data={"file": (io.BytesIO(jpeg()), "b.jpg")})
    assert again.get_json()["id"] == body["id"]  # same bytes, same model: the same job
    other = client.post("/v1/images", data={"file": (io.BytesIO(jpeg(color=(0, 0, 255))), "c.jpg")})
    assert other.get_json()["id"] != body["id"]
    assert len([p for p in Path(app_settings.storage).rglob("*") if p.is_file()]) == 2

    view = client.get(f"/v1/images/{body['id']}").get_json()
    assert view["status"] == "queued" and view["caption"] is None and view["error"] is None
    assert view["candidates"] == [] and view["tags"] == [] and view["size"] > 0


def test_health_and_readiness(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.get_json()
    assert ready.get_json()["checks"]["database"] == "ok"


def test_readiness_fails_without_a_checkpoint(app_settings, tmp_path):
    from dataclasses import replace

    from api import create_app

    app = create_app(replace(app_settings, model_path=str(tmp_path / "missing.pt")))
    ready = app.test_client().get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["checks"]["model"].startswith("error")


def test_openapi_documents_every_route(client):
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    app = client.application
    routes = {rule.rule.replace("<int:image_id>", "{id}").replace("<int:batch_id>", "{id}")
              for rule in app.url_map.iter_rules() if rule.endpoint != "static"}
    assert routes == set(spec["paths"])
    page = client.get("/docs")
    assert page.status_code == 200 and b"POST /v1/images" in page.data


def test_search_needs_words(client):
    assert_error(client.get("/v1/search"), 400, "invalid_request")
    assert client.get("/v1/search?q=dog").get_json() == {"query": "dog", "results": []}


def test_the_api_never_imports_torch(app_settings):
    # a fresh interpreter: this test process may already have torch from other tests
    code = ("import sys, json; from core.settings import Settings; from api import create_app; "
            f"app = create_app(Settings(**json.loads({json.dumps(json.dumps(app_settings.__dict__))}))); "
            "app.test_client().get('/readyz'); "
            "assert 'torch' not in sys.modules, 'torch was imported'; "
            "assert not any(m == 'worker' or m.startswith('worker.') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_broker_outage_still_accepts_uploads_for_the_sweep(app_settings):
    from dataclasses import replace

    from api import create_app

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    port = closed.getsockname()[1]
    try:
        app = create_app(replace(app_settings, broker_url=f"redis://127.0.0.1:{port}/0"))
        r = app.test_client().post("/v1/images", data={"file": (io.BytesIO(jpeg()), "a.jpg")})
    finally:
        closed.close()
    assert r.status_code == 202 and r.get_json()["status"] == "queued"  # the row is the truth
