"""The HTTP API through Flask's test client, on SQLite and a local storage folder (no broker:
submissions stay queued). The full path with a broker and workers is in test_distributed.py."""
import io
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

from PIL import Image

from captioner.core import queries

from conftest import keyed, make_key


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


def test_an_upload_over_the_limit_is_a_413(app_settings, api_key):
    from dataclasses import replace

    from captioner.api import create_app

    small = keyed(create_app(replace(app_settings, max_upload_bytes=1000)), api_key)
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
    # the name it was uploaded with (the first one: b.jpg was the same bytes), never where it is stored
    assert view["source"] == "a.jpg" and app_settings.storage not in json.dumps(view)
    assert view["sha256"] not in json.dumps(view).replace(f'"sha256": "{view["sha256"]}"', "")


def test_an_uploads_file_name_is_kept_as_metadata_never_as_a_path(client, app_settings):
    for sent, shown in [("../../etc/passwd.jpg", "passwd.jpg"), ("photos/2024/IMG 1.JPG", "IMG 1.JPG"),
                        ("a\x00b\u202e.jpg", "ab.jpg"), ("..", None), ("x" * 300 + ".jpg", "x" * 255)]:
        r = client.post("/v1/images", data={"file": (io.BytesIO(jpeg(color=(len(sent), 1, 2))), sent)})
        view = client.get(r.headers["Location"]).get_json()
        assert view["source"] == (shown or view["sha256"]), sent
    stored = [p.relative_to(app_settings.storage) for p in Path(app_settings.storage).rglob("*") if p.is_file()]
    assert all(p.parts[0] == "sha256" for p in stored) and len(stored) == 5  # stored by content, whatever the name


def test_upload_names_are_sanitised():
    from captioner.core.storage import upload_name

    assert upload_name("C:\\Users\\ann\\IMG_0001.JPG") == "IMG_0001.JPG"  # an old browser's whole path
    assert upload_name(" e\u0301t\u00e9.png ") == "\u00e9t\u00e9.png"  # NFC, trimmed
    assert upload_name("a\tb\u200b\ufeff.jpg") == "ab.jpg"  # control and format characters
    assert upload_name("dir/") is None and upload_name("") is None and upload_name(None) is None


def test_health_and_readiness(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.get_json()
    assert ready.get_json()["checks"]["database"] == "ok"
    # on this CPU host with onnxruntime installed, `auto` means ONNX Runtime
    assert ready.get_json()["checks"]["runtime"] == "onnx"


def test_readiness_fails_without_a_checkpoint(app_settings, tmp_path):
    from dataclasses import replace

    from captioner.api import create_app

    app = create_app(replace(app_settings, model_path=str(tmp_path / "missing.pt")))
    ready = app.test_client().get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["checks"]["model"].startswith("error")


def _api_routes(app) -> dict[str, set[str]]:
    """Documented path ({id} for every id) -> the methods its rules serve; the web interface's
    pages are HTML for people, not part of the API."""
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint != "static" and not rule.endpoint.startswith("web."):
            path = re.sub(r"<(?:\w+:)?\w+>", "{id}", rule.rule)
            routes.setdefault(path, set()).update(m.lower() for m in rule.methods - {"HEAD", "OPTIONS"})
    return routes


def test_openapi_documents_every_route_and_method(client):
    from captioner.api.docs import SPEC

    spec = client.get("/openapi.json").get_json()
    assert spec == json.loads(json.dumps(SPEC))  # what test_api_fuzz.py fuzzes is what clients get
    routes = _api_routes(client.application)
    assert set(routes) == set(spec["paths"])
    for path, served in routes.items():
        assert set(spec["paths"][path]) == served, path  # every rule + method, and nothing the app does not serve
        for method, op in spec["paths"][path].items():
            # every path refuses some method: 405 with the Allow header
            assert "Allow" in op["responses"]["405"]["headers"], (method, path)
            if path.startswith("/v1/"):  # behind require_scope: no key, a scope the key lacks, the rate limit
                assert {"401", "403", "429"} <= set(op["responses"]), (method, path)
            if "{id}" in path:
                assert "404" in op["responses"], (method, path)
            if op.get("requestBody") or any(p["in"] == "query" for p in op.get("parameters", [])):
                assert "400" in op["responses"], (method, path)
    page = client.get("/docs")
    assert page.status_code == 200 and b"POST /v1/images" in page.data and b"405" in page.data


def test_every_status_the_api_answers_is_documented(client, app_settings):
    """Probe every path with every method, without a key, with a key lacking the scope, with ids
    that do not exist and ids that do, with query parameters out of range and with bodies that
    are not JSON or not JSON at all: each answer's status must be documented for that operation,
    and a method the path does not serve must answer 405 as every operation there documents."""
    from captioner.api import MAX_ID
    from captioner.api.docs import METHODS, SPEC
    from captioner.core.db import make_engine, make_sessionmaker

    image_id = client.post("/v1/images", data={"file": (io.BytesIO(jpeg()), "a.jpg")}).get_json()["id"]
    engine = make_engine(app_settings.database_url)
    with make_sessionmaker(engine).begin() as s:
        batch_id = queries.create_batch(s, "1 image", "v", [image_id]).id
    engine.dispose()
    read = keyed(client.application, make_key(app_settings.database_url, scope="read"))
    anonymous = client.application.test_client()
    bad_queries = [{}, {"limit": "0"}, {"limit": "x"}, {"offset": "-1"}, {"status": "lost"}, {"status": ""},
                   {"format": "xml"}, {"include_failed": "maybe"}, {"q": "dog"}, {"q": "%%"}]
    bodies = [{}, {"json": {"unknown": 1}}, {"data": b"{not json", "content_type": "application/json"},
              {"data": b"text", "content_type": "text/plain"}]
    tried = 0
    for path, ops in SPEC["paths"].items():
        for method in METHODS:
            documented = set(ops[method]["responses"]) if method in ops else {"405"}
            for some_id in (image_id, batch_id, MAX_ID):
                url = path.replace("{id}", str(some_id))
                for caller in (anonymous, read, client):
                    for query in bad_queries if method == "get" else [{}]:
                        for body in bodies if method in ("post", "put", "patch") else [{}]:
                            r = caller.open(url, method=method.upper(), query_string=query, **body)
                            assert str(r.status_code) in documented, \
                                f"{method.upper()} {url}?{query} {body} answered {r.status_code}: {r.get_data()[:200]}"
                            tried += 1
    assert tried > 500


# codes no API client gets: the base class's and the defaults of classes every raise gives a finer
# code, the CLI's and the worker's, and the web pages' own (they answer in HTML; docs/security.md)
NOT_API_CODES = {"error", "access_denied", "conflict", "unauthenticated", "exiftool_missing", "too_many_images",
                 "webhook_failed", "signed_out", "csrf_failed"}


def test_every_error_code_is_in_the_http_api_doc():
    from conftest import REPO

    source = "\n".join(p.read_text() for folder in ("core", "api") for p in (REPO / folder).glob("*.py"))
    codes = (set(re.findall(r'code ?= ?"([a-z_]+)"', source)) | set(re.findall(r'_response\(\d+, "([a-z_]+)"', source))
             # Flask's own, named after the status (api/errors.py)
             | {"not_found", "method_not_allowed", "request_entity_too_large", "unsupported_media_type"})
    assert {"not_failed", "insufficient_scope", "rate_limited"} <= codes  # the scan finds them
    doc = (REPO / "docs" / "http-api.md").read_text()
    assert sorted(c for c in codes - NOT_API_CODES if f"`{c}`" not in doc) == []


def test_search_needs_words(client):
    assert_error(client.get("/v1/search"), 400, "invalid_request")
    assert client.get("/v1/search?q=dog").get_json() == {"query": "dog", "results": [], "next_offset": None}


def test_the_api_never_imports_torch(app_settings):
    # a fresh interpreter: this test process may already have torch from other tests
    code = ("import sys, json; from captioner.core.settings import Settings; from captioner.api import create_app; "
            f"app = create_app(Settings(**json.loads({json.dumps(json.dumps(app_settings.__dict__))}))); "
            "app.test_client().get('/readyz'); "
            "assert 'torch' not in sys.modules, 'torch was imported'; "
            "assert not any(m.startswith('captioner.worker') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_broker_outage_still_accepts_uploads_for_the_sweep(app_settings, api_key):
    from dataclasses import replace

    from captioner.api import create_app

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    port = closed.getsockname()[1]
    try:
        app = create_app(replace(app_settings, broker_url=f"redis://127.0.0.1:{port}/0"))
        r = keyed(app, api_key).post("/v1/images", data={"file": (io.BytesIO(jpeg()), "a.jpg")})
    finally:
        closed.close()
    assert r.status_code == 202 and r.get_json()["status"] == "queued"  # the row is the truth


def test_a_body_of_another_media_type_is_a_415(client):
    body = assert_error(client.post("/v1/images", data=b"s3://b/k", content_type="text/plain"), 415,
                        "unsupported_media_type")
    assert "text/plain" in body["error"]["message"]
    assert_error(client.post("/v1/images", data=jpeg(), content_type="image/jpeg"), 415, "unsupported_media_type")
    assert_error(client.post("/v1/batches", data={"file": (io.BytesIO(jpeg()), "a.jpg")}), 415,
                 "unsupported_media_type")


def test_unknown_fields_are_400s_that_name_the_field(client):
    cases = [("/v1/images", {"s3": {"bucket": "b", "key": "k"}, "queu": "backfill"}, "queu"),
             ("/v1/images", {"s3": {"bucket": "b", "key": "k", "region": "eu"}}, "s3.region"),
             ("/v1/batches", {"s3": {"bucket": "b", "key": "k"}}, "s3.key"),
             ("/v1/batches", {"images": [{"s3": {"bucket": "b", "key": "k"}, "tag": 1}]}, "images[0].tag")]
    for path, payload, field in cases:
        body = assert_error(client.post(path, json=payload), 400, "invalid_request")
        assert f"unknown field {field};" in body["error"]["message"]
    body = assert_error(client.post("/v1/images", data={"file": (io.BytesIO(jpeg()), "a.jpg"), "prio": "1"}), 400,
                        "invalid_request")
    assert "unknown field prio" in body["error"]["message"]
    body = assert_error(client.post("/v1/batches", json={"s3": {"bucket": "b"}, "images": []}), 400, "invalid_request")
    assert "not both" in body["error"]["message"]
    nameless = (b'--x\r\nContent-Disposition: form-data; filename="a.jpg"\r\n\r\n' + jpeg() + b"\r\n--x--\r\n")
    body = assert_error(client.post("/v1/images", data=nameless, content_type="multipart/form-data; boundary=x"), 400,
                        "invalid_request")
    assert "needs a name" in body["error"]["message"]


def test_s3_names_that_cannot_exist_are_400s(client):
    for s3, field in [({"bucket": "no spaces", "key": "k"}, "s3.bucket"), ({"bucket": "..", "key": "k"}, "s3.bucket"),
                      ({"bucket": "b", "key": "a\x00b"}, "s3.key"),
                      ({"bucket": "b", "key": "k" * 1025}, "s3.key"), ({"bucket": "b", "key": 7}, "s3.key")]:
        body = assert_error(client.post("/v1/images", json={"s3": s3}), 400, "invalid_request")
        assert body["error"]["message"].startswith(field)


def test_a_bucket_the_service_cannot_read_is_a_403(client, s3, app_settings):
    # the tenant may read both buckets: what is tested here is the service's own access
    make_key(app_settings.database_url, buckets=("s3://no-such-bucket-here", f"s3://{s3['S3_TEST_BUCKET']}"))
    # missing or forbidden: one answer, so the API does not tell callers which buckets exist
    body = assert_error(client.post("/v1/images", json={"s3": {"bucket": "no-such-bucket-here", "key": "a.jpg"}}),
                        403, "bucket_not_readable")
    assert "no-such-bucket-here" in body["error"]["message"]
    assert_error(client.post("/v1/batches", json={"s3": {"bucket": "no-such-bucket-here"}}), 403,
                 "bucket_not_readable")
    assert_error(client.post("/v1/images", json={"s3": {"bucket": s3["S3_TEST_BUCKET"], "key": "nope.jpg"}}), 404,
                 "source_not_found")


def test_ids_beyond_the_id_column_are_404s(client):
    for path in ("/v1/images/2147483648", "/v1/batches/99999999999999999999", "/v1/images/0", "/v1/images/-1"):
        assert_error(client.get(path), 404, "not_found")


def test_a_405_says_which_methods_are_allowed(client):
    r = client.delete("/v1/images")
    assert_error(r, 405, "method_not_allowed")
    assert set(r.headers["Allow"].split(", ")) == {"POST", "OPTIONS"}


def test_search_limit_and_odd_words(client):
    assert_error(client.get("/v1/search?q=dog&limit=0"), 400, "invalid_request")
    assert_error(client.get("/v1/search?q=dog&limit=101"), 400, "invalid_request")
    assert_error(client.get("/v1/search?q=%1D%20"), 400, "invalid_request")  # \x1d is white space to Python
    assert_error(client.get("/v1/search?q=a%00b"), 400, "invalid_request")  # PostgreSQL would refuse the NUL


def test_head_is_answered_like_get_without_a_body(client, app_settings, api_key):
    """HEAD on a view whose scopes are given per method (GET, PATCH) was a 500."""
    from captioner.api import create_app
    from conftest import signed_in

    image_id = client.post("/v1/images", data={"file": (io.BytesIO(jpeg()), "a.jpg")}).get_json()["id"]
    for path in (f"/v1/images/{image_id}", f"/v1/images/{image_id}/alt-text", "/healthz", "/v1/search?q=dog"):
        get, head = client.get(path), client.head(path)
        assert head.status_code == get.status_code < 500 and head.data == b"", (path, head.status_code)
        assert head.headers["Content-Type"] == get.headers["Content-Type"]
    app = create_app(app_settings)
    for page in (signed_in(app, api_key).head("/upload"), app.test_client().head("/sign-in")):
        assert page.status_code == 200 and page.data == b""


def test_malformed_json_bodies_are_400s(client):
    for raw in [b"[" * 100_000, b'{"s3": ' * 50_000, b'{"s3": {"bucket": "b", "key": "a\\ud800b"}}',
                b'{"s3": {"bucket": "b", "key": "\\udfff"}}', b'{"s3": "\xff\xfe"}', b"", b"\x00",
                b'{"s3": {"bucket": "b", "key": "k"}, "s3": 1e999999}', b"NaN"]:
        response = client.post("/v1/images", data=raw, content_type="application/json")
        assert response.status_code == 400, (raw[:40], response.status_code)
        assert response.get_json()["error"]["code"] == "invalid_request"
    body = assert_error(client.post("/v1/batches", data=b'{"images": [{"s3": {"bucket": "b", "key": "\\ud800"}}]}',
                                    content_type="application/json"), 400, "invalid_request")
    assert "surrogate" in body["error"]["message"]


def test_json_bodies_have_a_smaller_limit_than_uploads(app_settings, api_key):
    from dataclasses import replace

    from captioner.api import create_app
    from captioner.core.settings import Settings

    assert Settings().max_json_bytes == 1024 * 1024 < Settings().max_upload_bytes
    client = keyed(create_app(replace(app_settings, max_json_bytes=1000)), api_key)
    images = [{"s3": {"bucket": "b", "key": f"photo-{n}.jpg"}} for n in range(100)]
    body = assert_error(client.post("/v1/batches", json={"images": images}), 413, "too_large")
    assert "CAPTIONER_MAX_JSON_BYTES" in body["error"]["message"]
    assert len(jpeg()) > 1000  # an upload is not held to the JSON limit
    assert client.post("/v1/images", data={"file": (io.BytesIO(jpeg()), "a.jpg")}).status_code == 202
