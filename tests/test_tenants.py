"""Tenant isolation: tenant B, with a valid key of every scope, tries every route of the app on
tenant A's ids, captions and S3 objects, and gets 403 or 404, or (for a route without ids, like
search) an answer with nothing of A in it. The routes come from app.url_map, so a route added
later without a tenant check fails here; only the probes and the documentation are left out. The
web interface's pages are tried the same way, signed in with the same keys, forms with their
CSRF token."""
import io
import re

import pytest
from PIL import Image
from sqlalchemy import select

from captioner.api import create_app
from captioner.api.auth import OPEN
from conftest import csrf_token, keyed, make_key, signed_in
from captioner.core import queries
from captioner.core.db import make_engine, make_sessionmaker
from captioner.core.tables import Job
from test_api import assert_error, jpeg

CAPTION = "a zebracorn grazing beside a quokkaflower"  # words no other caption holds


def _caption_everything(database_url: str) -> None:
    """Write captions for every queued job, as a worker would (the model itself is not needed)."""
    engine = make_engine(database_url)
    sm = make_sessionmaker(engine)
    with sm.begin() as s:
        version = s.execute(select(Job.model_version)).scalars().first()
        claimed = queries.claim(s, version, 600, 1000)
        queries.complete(s, [queries.Result(c, CAPTION, CAPTION, [(CAPTION, 0.9)], [("zebracorn", 0.8)], 0.9, False,
                                            8, 8) for c in claimed], [], version, forward_size=len(claimed))
    engine.dispose()


@pytest.fixture
def world(app_settings, s3):
    """Tenant A with an upload, an S3 image, a batch of a prefix, all captioned; tenant B with keys."""
    from captioner.core import storage

    bucket = s3["S3_TEST_BUCKET"]
    for name in ("one.png", "two.png"):
        out = io.BytesIO()
        Image.new("RGB", (8, 8), (len(name) * 20, 0, 0)).save(out, "PNG")
        storage.s3_client().put_object(Bucket=bucket, Key=f"tenant-a/{name}", Body=out.getvalue())
    app = create_app(app_settings)
    url = app_settings.database_url
    a_key = make_key(url, tenant="a", buckets=(f"s3://{bucket}/tenant-a/",))
    a = keyed(app, a_key)
    upload = a.post("/v1/images", data={"file": (io.BytesIO(jpeg()), "a.jpg")})
    s3_image = a.post("/v1/images", json={"s3": {"bucket": bucket, "key": "tenant-a/one.png"}})
    batch = a.post("/v1/batches", json={"s3": {"bucket": bucket, "prefix": "tenant-a/"}})
    assert {upload.status_code, s3_image.status_code, batch.status_code} == {202}, batch.get_json()
    _caption_everything(url)
    image = a.get(f"/v1/images/{upload.get_json()['id']}").get_json()
    assert image["caption"] == CAPTION
    return {
        "app": app, "a": a, "bucket": bucket,
        # what B must never see and never sends itself (B searches for two of the caption's words):
        # A's caption, the upload's hash and where it is stored
        "secrets": [CAPTION, image["sha256"], image["source"]],
        # URL parameters of A's objects, by name; a new route's parameter must be added here
        "ids": {"image_id": upload.get_json()["id"], "batch_id": batch.get_json()["id"]},
        "b_keys": (b_keys := {scope: make_key(url, tenant="b", scope=scope) for scope in ("read", "write", "admin")}),
        "b": {scope: keyed(app, key) for scope, key in b_keys.items()},
        # the web interface, signed in with the same keys
        "a_web": signed_in(app, a_key),
        "b_web": {scope: signed_in(app, key) for scope, key in b_keys.items()},
    }


def _routes(app):
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.endpoint in OPEN:
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield rule, method


def _url(rule, ids: dict[str, int]) -> str:
    missing = set(rule.arguments) - set(ids)
    assert not missing, f"{rule.rule}: give this test tenant A's object for {missing}"
    return re.sub(r"<(?:\w+:)?(\w+)>", lambda m: str(ids[m.group(1)]), rule.rule)


WEB_FORMS = [{"state": "approved"}, {"state": "edited", "text": "B was here."}, {"state": "decorative"},
             {"return_to": "review", "state": "approved"}]  # and an upload, made per request


def _bodies(bucket: str) -> list[dict]:
    """Bodies naming A's S3 objects in every shape a route reads them, and valid alt-text decisions."""
    return [{"s3": {"bucket": bucket, "key": "tenant-a/one.png"}}, {"s3": {"bucket": bucket, "prefix": "tenant-a/"}},
            {"s3": {"bucket": bucket, "prefix": ""}}, {"images": [{"s3": {"bucket": bucket, "key": "tenant-a/two.png"}}]},
            {"state": "approved"}, {"state": "edited", "text": "B was here."}, {"state": "decorative"}]


def test_tenant_b_reaches_nothing_of_tenant_a(world):
    app = world["app"]
    tried = 0
    for rule, method in _routes(app):
        url = _url(rule, world["ids"])
        web = rule.endpoint.startswith("web.")
        query = {"q": "zebracorn quokkaflower", "limit": 100}
        owner = world["a_web"] if web else world["a"]
        if method == "GET" and rule.arguments:  # A itself reaches it: the ids are right
            assert owner.get(url, query_string=query).status_code == 200, url
        for scope in world["b"]:
            b = world["b_web"][scope] if web else world["b"][scope]
            if method in ("GET", "DELETE"):
                answers = [b.open(url, method=method, query_string=query)]
            elif web:
                token = csrf_token(b, "/")
                answers = [b.open(url, method=method, data={**form, "csrf_token": token}) for form in WEB_FORMS]
                answers.append(b.open(url, method=method, data={"csrf_token": token,
                                                                "files": (io.BytesIO(jpeg((0, 0, 90))), "b.jpg")}))
            else:
                answers = [b.open(url, method=method, json=body) for body in _bodies(world["bucket"])]
            if rule.arguments:  # a body this route does not take may be a 400, but not one answer may succeed
                assert any(r.status_code in (403, 404) for r in answers), f"{method} {url} as B ({scope})"
            for r in answers:
                text = r.get_data(as_text=True)
                where = f"{method} {url} as B ({scope}): {r.status_code} {text[:300]}"
                if rule.arguments:
                    assert r.status_code in (400, 403, 404), where
                elif web and r.status_code == 303:  # an upload of B's own, going to its page
                    assert r.headers["Location"].startswith(("/images/", "/batches/")), where
                else:
                    assert r.status_code in (200, 400, 403, 404), where
                for secret in world["secrets"]:
                    assert secret not in text, where
                tried += 1
    assert tried >= 20


def test_b_may_not_submit_a_objects_even_with_admin(world):
    bucket = world["bucket"]
    for scope, b in world["b"].items():
        if scope == "read":
            continue
        for path, body in (("/v1/images", {"s3": {"bucket": bucket, "key": "tenant-a/one.png"}}),
                           ("/v1/batches", {"s3": {"bucket": bucket, "prefix": "tenant-a/"}}),
                           ("/v1/batches", {"images": [{"s3": {"bucket": bucket, "key": "tenant-a/one.png"}}]}),
                           ("/v1/images", {"s3": {"bucket": "no-such-bucket-here", "key": "x.jpg"}})):
            body = assert_error(b.post(path, json=body), 403, "bucket_not_allowed")
            assert "allow-bucket" in body["error"]["message"]


def test_an_allowance_covers_its_prefix_only(world, app_settings):
    bucket = world["bucket"]
    b = keyed(world["app"], make_key(app_settings.database_url, tenant="b", buckets=(f"s3://{bucket}/tenant-a/one",)))
    assert b.post("/v1/images", json={"s3": {"bucket": bucket, "key": "tenant-a/one.png"}}).status_code == 202
    assert_error(b.post("/v1/images", json={"s3": {"bucket": bucket, "key": "tenant-a/two.png"}}), 403,
                 "bucket_not_allowed")
    assert_error(b.post("/v1/batches", json={"s3": {"bucket": bucket, "prefix": "tenant-a/"}}), 403,
                 "bucket_not_allowed")
    # the same object, submitted by B, is B's own image: A's caption does not come with it
    mine = b.get(b.post("/v1/images", json={"s3": {"bucket": bucket, "key": "tenant-a/one.png"}}).headers["Location"])
    assert mine.get_json()["status"] == "queued" and mine.get_json()["caption"] is None
    assert b.get("/v1/search", query_string={"q": "zebracorn"}).get_json()["results"] == []
    assert world["a"].get("/v1/search", query_string={"q": "zebracorn"}).get_json()["results"]


def test_urls_are_never_fetched(world):
    for body in ({"url": "http://169.254.169.254/latest/meta-data"}, {"s3": "http://example.com/a.jpg"},
                 {"images": [{"url": "https://example.com/a.jpg"}]}):
        for path in ("/v1/images", "/v1/batches"):
            assert_error(world["a"].post(path, json=body), 400, "invalid_request")


def test_tenants_cli_allows_and_denies_buckets(app_settings, monkeypatch):
    from click.testing import CliRunner

    from captioner.cli import cli
    from captioner.core.settings import get_settings

    monkeypatch.setenv("CAPTIONER_DATABASE_URL", app_settings.database_url)
    get_settings.cache_clear()
    try:
        run = CliRunner().invoke
        assert run(cli, ["tenants", "allow-bucket", "acme", "s3://photos/acme/"]).exit_code == 0
        assert run(cli, ["tenants", "allow-bucket", "acme", "s3://photos/acme/"]).exit_code == 0  # twice is once
        assert run(cli, ["tenants", "list"]).output.splitlines() == ["acme  s3://photos/acme/"]
        assert run(cli, ["tenants", "allow-bucket", "acme", "photos"]).exit_code == 1  # not an s3:// location
        assert run(cli, ["tenants", "deny-bucket", "acme", "s3://photos/acme/"]).exit_code == 0
        assert run(cli, ["tenants", "deny-bucket", "acme", "s3://photos/acme/"]).exit_code == 1
        assert run(cli, ["tenants", "list"]).output == ""
    finally:
        get_settings.cache_clear()


def test_cli_search_is_per_tenant(world, app_settings, monkeypatch):
    from click.testing import CliRunner

    from captioner.cli import cli
    from captioner.core.settings import get_settings

    monkeypatch.setenv("CAPTIONER_DATABASE_URL", app_settings.database_url)
    get_settings.cache_clear()
    try:
        mine = CliRunner().invoke(cli, ["search", "zebracorn", "--tenant", "a", "--json"])
        default = CliRunner().invoke(cli, ["search", "zebracorn", "--json"])
    finally:
        get_settings.cache_clear()
    assert mine.exit_code == 0 and CAPTION in mine.output
    assert default.exit_code == 0 and CAPTION not in default.output
