"""The web interface through Flask's test client, on SQLite and a local storage folder: signing in
and out, sessions that end with their key, CSRF, scopes, tenants, paging, the review queue,
uploads, batches and cached thumbnails. Captions are written as a worker writes them; the whole
path with a real worker and a real browser is tests/test_web_browser.py."""
import base64
import io
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select

from captioner.api import create_app
from conftest import csrf_token, keyed, make_key, signed_in
from captioner.core import auth, queries
from captioner.core.db import make_engine, make_sessionmaker
from captioner.core.tables import ApiKey, Job
from test_api import assert_error, jpeg

UNSURE = "A dog runs through the tall grass."
SURE = "A red kite flies over a sandy beach."


@pytest.fixture
def app(app_settings):
    app = create_app(app_settings)
    app.config["TESTING"] = True
    return app


def caption_queued(app, text: str, needs_review: bool, quality: float | None = None) -> list[int]:
    """Write a caption for every queued job, as a worker does -> the image ids."""
    sm = app.extensions["captioner"].sessionmaker
    with sm.begin() as s:
        version = s.scalars(select(Job.model_version)).first()
        claimed = queries.claim(s, version, 600, 1000)
        queries.complete(s, [queries.Result(c, text.rstrip("."), text, [(text, 0.3), ("A dog plays.", 0.2)],
                                            [("collie", 0.6), ("grass", 0.3)], 0.3 if needs_review else 0.9,
                                            needs_review, 640, 480, quality) for c in claimed], [], version,
                                            len(claimed))
    return [c.image_id for c in claimed]


def upload(client, *photos: bytes):
    files = [(io.BytesIO(p), f"photo{n}.jpg") for n, p in enumerate(photos)]
    return client.post("/upload", data={"csrf_token": csrf_token(client, "/upload"), "files": files})


def decide(client, image_id: int, **form: str):
    return client.post(f"/images/{image_id}/alt-text", data={"csrf_token": csrf_token(client, f"/images/{image_id}"),
                                                             **form})


def session_payload(client) -> dict:
    """What the signed (not encrypted) session cookie carries: anyone holding it can read this."""
    cookie = client.get_cookie("captioner_session").value
    data = cookie.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))


def text(response) -> str:
    return response.get_data(as_text=True)


# ---------------------------------------------------------------- signing in and out


def test_sign_in_and_out(app, app_settings):
    key = make_key(app_settings.database_url, tenant="acme")
    client = app.test_client()
    r = client.get("/review")
    assert r.status_code == 303 and r.headers["Location"] == "/sign-in?next=/review"
    form = client.get(r.headers["Location"])
    assert form.status_code == 200 and '<label for="key">API key</label>' in text(form)
    r = client.post("/sign-in", data={"key": key, "next": "/review", "csrf_token": csrf_token(client)})
    assert r.status_code == 303 and r.headers["Location"] == "/review"
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    payload = session_payload(client)
    assert set(payload) == {"key_id", "signed_in_at", "generation"} and key not in json.dumps(payload)  # never the key
    page = client.get("/")
    assert page.status_code == 200 and "Tenant <strong>acme</strong>" in text(page) and key[:16] in text(page)

    copied = app.test_client()  # the same cookie, copied to another browser before signing out
    copied.set_cookie("captioner_session", client.get_cookie("captioner_session").value)
    assert copied.get("/").status_code == 200
    other = signed_in(app, key)  # another session of the same key, elsewhere

    r = client.post("/sign-out", data={"csrf_token": csrf_token(client, "/")})
    assert r.status_code == 303 and r.headers["Location"] == "/sign-in"
    assert "Signed out." in text(client.get("/sign-in"))
    assert client.get("/").status_code == 303
    for elsewhere in (copied, other):  # sign out ends the session everywhere
        r = elsewhere.get("/")
        assert r.status_code == 303 and r.headers["Location"].startswith("/sign-in")
        assert "signed out" in text(elsewhere.get(r.headers["Location"]))
    assert signed_in(app, key).get("/").status_code == 200  # signing in again works


def test_a_wrong_key_is_refused_on_the_form(app, app_settings):
    client = app.test_client()
    for wrong in ("", "nonsense", make_key(app_settings.database_url) + "x"):
        r = client.post("/sign-in", data={"key": wrong, "csrf_token": csrf_token(client)})
        assert r.status_code == 401 and "not a valid API key" in text(r) and 'aria-invalid="true"' in text(r)
        assert client.get("/").status_code == 303


def test_sign_in_goes_back_only_to_this_site(app, api_key):
    client = app.test_client()
    for target, expected in (("/search?q=dog", "/search?q=dog"), ("//evil.example/x", "/"),
                             ("https://evil.example/", "/"), ("/\\evil.example", "/"), ("/\t/evil.example", "/"),
                             ("javascript:alert(1)", "/")):
        client.post("/sign-out", data={"csrf_token": csrf_token(client)})
        r = client.post("/sign-in", data={"key": api_key, "next": target, "csrf_token": csrf_token(client)})
        assert r.headers["Location"] == expected, target


def test_a_revoked_key_ends_its_sessions(app, app_settings, api_key):
    client = signed_in(app, api_key)
    assert client.get("/").status_code == 200
    engine = make_engine(app_settings.database_url)
    with make_sessionmaker(engine).begin() as s:
        key_id = s.scalars(select(ApiKey.id)).one()
        auth.revoke_key(s, key_id)
    engine.dispose()
    r = client.get("/")
    assert r.status_code == 303 and r.headers["Location"].startswith("/sign-in")
    assert f"API key {key_id} was revoked" in text(client.get(r.headers["Location"]))
    # the session is gone: signing in again with the revoked key is refused too
    r = client.post("/sign-in", data={"key": api_key, "csrf_token": csrf_token(client)})
    assert r.status_code == 401 and "revoked" in text(r)


def test_a_session_ends_twelve_hours_after_signing_in(app, api_key):
    client = signed_in(app, api_key)
    with client.session_transaction() as s:
        s["signed_in_at"] -= 12 * 3600 - 60  # a minute left
    assert client.get("/").status_code == 200
    with client.session_transaction() as s:
        s["signed_in_at"] -= 120
    r = client.get("/")
    assert r.status_code == 303 and "Sessions last 12 hours" in text(client.get(r.headers["Location"]))


def test_the_session_cookie_is_secure_when_configured(app_settings, api_key):
    app = create_app(replace(app_settings, session_cookie_secure=True))
    client = app.test_client()
    r = client.post("/sign-in", base_url="https://localhost", headers={"Referer": "https://localhost/sign-in"},
                    data={"key": api_key, "csrf_token": csrf_token(client)})
    assert r.status_code == 303 and "Secure" in r.headers["Set-Cookie"]


def test_one_secret_for_every_api_process_and_restarts(app_settings, api_key):
    client = signed_in(create_app(app_settings), api_key)
    cookie = client.get_cookie("captioner_session").value
    other = create_app(app_settings).test_client()  # another process of the fleet, or this one restarted
    other.set_cookie("captioner_session", cookie)
    assert other.get("/").status_code == 200
    configured = create_app(replace(app_settings, secret_key="s" * 43)).test_client()
    configured.set_cookie("captioner_session", cookie)
    assert configured.get("/").status_code == 303  # signed with another key: not signed in


def test_the_api_starts_without_its_database(app_settings, tmp_path):
    # the session secret is read on a page's first use, not at start-up: the probes still answer
    app = create_app(replace(app_settings, database_url=f"sqlite:///{tmp_path}/missing/dir/db.sqlite"))
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503


def test_auth_off_needs_no_sign_in(app_settings):
    client = create_app(replace(app_settings, auth="off")).test_client()
    page = client.get("/")
    assert page.status_code == 200 and "Tenant <strong>default</strong>" in text(page) and "Sign out" not in text(page)
    assert client.get("/sign-in").headers["Location"] == "/"
    r = upload(client, jpeg())
    assert r.status_code == 303
    decided = client.post("/images/1/alt-text",
                          data={"state": "decorative", "csrf_token": csrf_token(client, "/upload")})
    assert decided.status_code == 303
    assert client.get("/v1/images/1/alt-text").get_json()["by"] == "local user (auth off)"


# ---------------------------------------------------------------- the API and the pages stay apart


def test_the_api_refuses_a_session_cookie_without_its_key(app, api_key):
    client = signed_in(app, api_key)
    upload(client, jpeg())
    assert client.get("/images/1").status_code == 200
    r = client.get("/v1/images/1")
    assert_error(r, 401, "missing_api_key")
    assert "Set-Cookie" not in r.headers
    assert_error(client.patch("/v1/images/1/alt-text", json={"state": "decorative"}), 401, "missing_api_key")
    # and an API key is no way into the pages: they need the cookie
    assert keyed(app, api_key).get("/").status_code == 303


def test_a_form_without_its_csrf_token_is_refused(app, api_key):
    client = signed_in(app, api_key)
    upload(client, jpeg())
    for data in ({"state": "decorative"}, {"state": "decorative", "csrf_token": "forged"}):
        r = client.post("/images/1/alt-text", data=data)
        assert r.status_code == 400 and r.mimetype == "text/html"
        assert "CSRF token" in text(r) and "reload the page" in text(r)
    other = signed_in(app, api_key)  # a token of another session is no good either
    r = other.post("/images/1/alt-text", data={"state": "decorative", "csrf_token": csrf_token(client, "/")})
    assert r.status_code == 400
    assert keyed(app, api_key).get("/v1/images/1/alt-text").get_json()["state"] is None  # nothing was decided
    assert app.test_client().post("/sign-in", data={"key": api_key}).status_code == 400


def test_pages_send_a_content_security_policy(app, api_key):
    page = signed_in(app, api_key).get("/")
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert "<script>" not in text(page) and "style=" not in text(page)  # the policy allows neither inline


def test_errors_are_pages_for_people_and_json_for_the_api(app, api_key):
    r = signed_in(app, api_key).get("/images/4242")
    assert r.status_code == 404 and r.mimetype == "text/html" and "no image with id 4242" in text(r)
    assert_error(keyed(app, api_key).get("/v1/images/4242"), 404, "not_found")


# ---------------------------------------------------------------- scopes and tenants


def test_a_read_only_key_sees_but_cannot_change(app, app_settings, api_key):
    writer = signed_in(app, api_key)
    upload(writer, jpeg())
    caption_queued(app, UNSURE, needs_review=True)
    reader = signed_in(app, make_key(app_settings.database_url, scope="read"))
    page = reader.get("/images/1")
    assert page.status_code == 200 and UNSURE in text(page) and "(read only)" in text(page)
    assert "Approve" not in text(page) and "needs a key with the write scope" in text(page), text(page)
    assert "uploading needs a key with the write scope" in text(reader.get("/upload"))
    for r in (decide(reader, 1, state="approved"), upload(reader, jpeg((1, 2, 3)))):
        assert r.status_code == 403 and r.mimetype == "text/html" and "lacks the write scope" in text(r)
    assert keyed(app, api_key).get("/v1/images/1/alt-text").get_json()["state"] == "needs_review"


def test_another_tenant_sees_nothing(app, app_settings, api_key):
    mine = signed_in(app, api_key)
    upload(mine, jpeg())
    caption_queued(app, SURE, needs_review=False)
    assert mine.get("/images/1/thumbnail").status_code == 200
    theirs = signed_in(app, make_key(app_settings.database_url, tenant="other"))
    for path in ("/images/1", "/images/1/thumbnail", "/images/1/preview"):
        r = theirs.get(path)
        assert r.status_code == 404 and SURE not in text(r), path
    assert theirs.get("/images/1/thumbnail", headers={"If-None-Match": mine.get("/images/1/thumbnail").headers["ETag"]}
                      ).status_code == 404  # not even "not modified"
    assert SURE not in text(theirs.get("/")) and SURE not in text(theirs.get("/search?q=kite"))
    assert SURE in text(mine.get("/search?q=kite"))


# ---------------------------------------------------------------- browsing


def test_the_gallery_pages_newest_first(app, api_key):
    client = signed_in(app, api_key)
    sm = app.extensions["captioner"].sessionmaker
    with sm.begin() as s:
        queries.submit(s, [queries.NewImage(f"file:///photos/{n}.jpg", f"sha256:{n:064d}") for n in range(30)],
                       "v1", "backfill")

    def ids(page) -> list[int]:
        return [int(i) for i in re.findall(r'<h2 class="card-title"><a href="/images/(\d+)"', text(page))]

    first = client.get("/")
    assert ids(first) == list(range(30, 6, -1))  # 24 a page
    assert 'href="/?before=7" rel="next">Older' in text(first) and "Newer" not in text(first)
    last = client.get("/?before=7")
    assert ids(last) == [6, 5, 4, 3, 2, 1] and "Older" not in text(last)
    assert 'href="/?after=6" rel="prev">' in text(last)
    assert ids(client.get("/?after=6")) == list(range(30, 6, -1))  # the newest page again, full
    middle = client.get("/?before=25")
    assert ids(middle) == list(range(24, 0, -1))
    assert ids(client.get("/?after=24")) == list(range(30, 6, -1))
    assert client.get("/?before=-1").status_code == 400


def test_search_finds_a_word_of_the_caption_and_shows_its_thumbnail(app, api_key):
    client = signed_in(app, api_key)
    upload(client, jpeg())
    caption_queued(app, SURE, needs_review=False)
    page = text(client.get("/search?q=kite"))
    assert SURE.rstrip(".") in page
    assert '<img src="/images/1/thumbnail" alt="A red kite flies over a sandy beach."' in page
    assert "Nothing found" in text(client.get("/search?q=zebra"))
    bad = client.get("/search?q=%22%22")
    assert bad.status_code == 400 and "no words to search for" in text(bad)


def test_the_image_page_shows_candidates_tags_version_and_history(app, api_key):
    client = signed_in(app, api_key)
    upload(client, jpeg())
    page = client.get("/images/1")
    assert "queued" in text(page) and 'data-refresh-seconds="2"' in text(page)  # it updates itself until done
    caption_queued(app, UNSURE, needs_review=True)
    page = text(client.get("/images/1"))
    assert "data-refresh-seconds" not in page
    for part in (UNSURE, "A dog plays.", "0.300", "collie", "0.600", "needs review", "Alt-text history"):
        assert part in page, part
    version = keyed(app, api_key).get("/v1/images/1").get_json()["model_version"]
    assert version in page


def test_decisions_follow_the_alt_text_rules(app, api_key):
    client = signed_in(app, api_key)
    upload(client, jpeg())
    r = decide(client, 1, state="approved")  # nothing to approve before a caption: the API's 409, said on the page
    assert r.status_code == 303 and "has no caption yet" in text(client.get(r.headers["Location"]))
    caption_queued(app, UNSURE, needs_review=True)
    r = decide(client, 1, state="edited", text="   ")
    assert "edited needs a non-empty text" in text(client.get(r.headers["Location"]))
    r = decide(client, 1, state="edited", text="Image of a collie.jpg running")
    page = text(client.get(r.headers["Location"]))
    assert "alt text saved" in page and "contains a file name" in page  # the API's warnings, shown
    assert decide(client, 1, state="approved").status_code == 303
    api = keyed(app, api_key).get("/v1/images/1/alt-text").get_json()
    assert (api["state"], api["text"], api["by"]) == ("approved", UNSURE, f"key {api_key[:16]}")
    assert [h["state"] for h in api["history"]] == ["needs_review", "edited", "approved"]
    history = text(client.get("/images/1"))
    assert history.count(f"key {api_key[:16]}") >= 2


# ---------------------------------------------------------------- the review queue


def test_the_review_queue_approves_and_moves_on(app, api_key):
    client = signed_in(app, api_key)
    upload(client, jpeg((1, 1, 1)), jpeg((2, 2, 2)), jpeg((3, 3, 3)))
    caption_queued(app, UNSURE, needs_review=True)
    upload(client, jpeg((4, 4, 4)))
    caption_queued(app, SURE, needs_review=False)  # sure of this one: never in the queue
    page = text(client.get("/review"))
    assert "Image 1 " in page and 'aria-keyshortcuts="a"' in page and '<span class="count">3' in page
    assert 'name="return_to" value="review"' in page
    r = decide(client, 1, state="approved", return_to="review")
    assert r.headers["Location"] == "/review"
    page = text(client.get("/review"))
    assert "Image 2 " in page and "Image 1: alt text approved." in page and '<span class="count">2' in page
    skipped = text(client.get("/review?after=2"))  # skip 2
    assert "Image 3 " in skipped
    assert "after the ones you skipped" in text(client.get("/review?after=3"))
    client.post("/images/3/alt-text", data={"state": "decorative", "return_to": "review",
                                            "csrf_token": csrf_token(client, "/review")})
    assert "Image 2 " in text(client.get("/review"))
    decide(client, 2, state="edited", text="A black dog in tall grass.", return_to="review")
    assert "Nothing to review" in text(client.get("/review"))
    states = [keyed(app, api_key).get(f"/v1/images/{i}/alt-text").get_json()["state"] for i in (1, 2, 3, 4)]
    assert states == ["approved", "edited", "decorative", "generated"]


def test_the_review_queue_shows_the_most_doubtful_first_and_skips_in_that_order(app, api_key):
    client = signed_in(app, api_key)
    for n, quality in enumerate((0.6, None, 0.1)):  # image 2: a model without a quality estimate
        upload(client, jpeg((n, n, n)))
        caption_queued(app, UNSURE, needs_review=True, quality=quality)

    def shown(page: str) -> int:
        return int(re.search(r"<h2>Image (\d+) ", page).group(1))

    page = text(client.get("/review"))
    assert shown(page) == 3 and "quality 0.100" in page
    page = text(client.get("/review?after=3"))
    assert shown(page) == 1 and "quality 0.600" in page
    page = text(client.get("/review?after=1"))
    assert shown(page) == 2 and "quality 0." not in page
    assert "after the ones you skipped" in text(client.get("/review?after=2"))
    decide(client, 3, state="approved", return_to="review")
    assert shown(text(client.get("/review"))) == 1

    image = text(client.get("/images/1"))
    assert "<dt>Quality</dt><dd>0.600 (estimated probability that the caption is right)</dd>" in image
    assert "<dt>Quality</dt><dd>—</dd>" in text(client.get("/images/2"))
    gallery = text(client.get("/"))
    assert gallery.count('class="quality"') == 2 and "quality 0.60</span>" in gallery and "quality 0.10</span>" in gallery


# ---------------------------------------------------------------- uploads, batches, thumbnails


def test_one_upload_opens_its_page_several_make_a_batch(app, api_key):
    client = signed_in(app, api_key)
    r = upload(client, jpeg())
    assert r.status_code == 303 and r.headers["Location"] == "/images/1"
    r = upload(client, jpeg((9, 9, 9)), b"not an image", jpeg((8, 8, 8)))
    assert r.status_code == 303 and r.headers["Location"] == "/batches/1"
    page = client.get(r.headers["Location"])
    assert "photo1.jpg: not an image" in text(page)
    assert "0 of 2 finished" in text(page) and 'data-refresh-seconds="3"' in text(page)
    caption_queued(app, SURE, needs_review=False)
    page = text(client.get("/batches/1"))
    assert "2 of 2 finished" in page and "data-refresh-seconds" not in page and "finished</dd>" in page
    assert "Batch 1</a>" in text(client.get("/batches"))
    refused = upload(client, b"junk")
    assert refused.status_code == 422 and "Nothing was uploaded" in text(refused)
    assert upload(client).status_code == 400


def test_a_batch_page_lists_its_failures_filters_by_status_and_cancels(app, app_settings, api_key):
    client = signed_in(app, api_key)
    assert upload(client, jpeg((1, 1, 1)), jpeg((2, 2, 2)), jpeg((3, 3, 3))).headers["Location"] == "/batches/1"
    sm = app.extensions["captioner"].sessionmaker
    with sm.begin() as s:  # a worker captions the first, the second fails, the third waits
        version = s.scalars(select(Job.model_version)).first()
        ok, bad = queries.claim(s, version, 600, 2)
        queries.complete(s, [queries.Result(ok, "A kite", "A kite.", [("A kite", 0.9)], [], 0.9, False, 8, 8)],
                         [queries.Failure(bad, "invalid_image", "truncated or corrupt JPEG file")], version, 1)
    page = text(client.get("/batches/1"))
    assert "Failed images" in page and "truncated or corrupt JPEG file" in page
    assert "<td>photo1.jpg</td>" in page and "<code>invalid_image</code> 1" in page  # its name; failures by code
    assert "Cancel the 1 queued" in page and "Failed (1)" in page
    failed_only = text(client.get("/batches/1?status=failed"))
    assert failed_only.count('class="card"') == 1 and 'aria-current="page">Failed (1)' in failed_only
    assert text(client.get("/batches/1?status=queued")).count('class="card"') == 1
    assert client.get("/batches/1?status=lost").status_code == 400

    reader = signed_in(app, make_key(app_settings.database_url, scope="read"))
    assert "Cancel the" not in text(reader.get("/batches/1"))
    r = reader.post("/batches/1/cancel", data={"csrf_token": csrf_token(reader, "/batches/1")})
    assert r.status_code == 403
    theirs = signed_in(app, make_key(app_settings.database_url, tenant="other"))
    assert theirs.post("/batches/1/cancel", data={"csrf_token": csrf_token(theirs, "/")}).status_code == 404
    assert client.post("/batches/1/cancel").status_code == 400  # no CSRF token

    r = client.post("/batches/1/cancel", data={"csrf_token": csrf_token(client, "/batches/1")})
    assert r.status_code == 303 and r.headers["Location"] == "/batches/1"
    page = text(client.get("/batches/1"))
    assert "1 queued images cancelled" in page and "Cancel the" not in page
    assert "batch 1 was cancelled" in page and "<code>cancelled</code> 1" in page
    r = client.post("/batches/1/cancel", data={"csrf_token": csrf_token(client, "/batches/1")})  # again: nothing
    assert "Nothing left to cancel" in text(client.get(r.headers["Location"]))


def _big_photo() -> bytes:
    """A 2000x1500 JPEG with detail (a gradient and stripes), standing in for a camera photo."""
    im = Image.linear_gradient("L").resize((2000, 1500)).convert("RGB")
    for x in range(0, 2000, 40):
        im.paste((200, 40, 40), (x, 0, x + 8, 1500))
    out = io.BytesIO()
    im.save(out, "JPEG", quality=90)
    return out.getvalue()


def test_thumbnails_are_made_once_small_and_cached(app, app_settings, api_key):
    client = signed_in(app, api_key)
    photo = _big_photo()
    upload(client, photo)
    caption_queued(app, SURE, needs_review=False)
    store = Path(app_settings.storage)
    first = client.get("/images/1/thumbnail")
    assert first.status_code == 200 and first.mimetype == "image/webp"
    assert len(first.data) < min(30_000, len(photo) // 10)
    assert Image.open(io.BytesIO(first.data)).size == (320, 240)
    assert "private" in first.headers["Cache-Control"] and "immutable" in first.headers["Cache-Control"]
    [cached] = list((store / "thumbnails" / "320").rglob("*.webp"))
    assert cached.read_bytes() == first.data
    # the photo itself is gone: the next answer can only come from the stored thumbnail, not a decode
    [original] = list((store / "sha256").rglob("*"))[-1:]
    original.unlink()
    second = client.get("/images/1/thumbnail")
    assert second.status_code == 200 and second.data == first.data
    assert client.get("/images/1/thumbnail", headers={"If-None-Match": first.headers["ETag"]}).status_code == 304
    assert client.get("/images/1/preview").status_code == 404  # never made, and the photo is gone


def test_a_thumbnail_is_upright(app, api_key):
    client = signed_in(app, api_key)
    im = Image.new("RGB", (400, 200), (0, 120, 200))
    exif = im.getexif()
    exif[0x0112] = 6  # shown turned a quarter clockwise: the photo is portrait
    out = io.BytesIO()
    im.save(out, "JPEG", exif=exif)
    upload(client, out.getvalue())
    caption_queued(app, SURE, needs_review=False)
    assert Image.open(io.BytesIO(client.get("/images/1/thumbnail").data)).size == (160, 320)
    assert Image.open(io.BytesIO(client.get("/images/1/preview").data)).size == (200, 400)  # never upscaled


def test_thumbnails_are_kept_in_s3_storage(app_settings, api_key, s3):
    from captioner.core import storage

    bucket = s3["S3_TEST_BUCKET"]
    app = create_app(replace(app_settings, storage=f"s3://{bucket}/web-uploads"))
    client = signed_in(app, api_key)
    upload(client, _big_photo())
    caption_queued(app, SURE, needs_review=False)
    first = client.get("/images/1/thumbnail")
    assert first.status_code == 200
    listed = storage.s3_client().list_objects_v2(Bucket=bucket, Prefix="web-uploads/thumbnails/320/")
    [stored] = [o["Key"] for o in listed["Contents"]]
    assert storage.s3_client().get_object(Bucket=bucket, Key=stored)["Body"].read() == first.data
    storage.s3_client().put_object(Bucket=bucket, Key=stored, Body=b"kept")  # what is stored is what is served
    assert client.get("/images/1/thumbnail").data == b"kept"


def test_the_api_decodes_no_uncaptioned_image_and_remembers_a_failure(app, app_settings, api_key, monkeypatch):
    """Found by the audit: thumbnails and previews decoded untrusted uploads inside the API's
    request threads, and a failure was decoded again on every request. Now an image no worker has
    captioned has no rendition (409), one is made in a bounded child process, and a failure is kept."""
    from captioner.core import decode, thumbnails

    calls = []
    real = decode.decode
    monkeypatch.setattr(decode, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    client = signed_in(app, api_key)
    upload(client, jpeg())
    r = client.get("/images/1/thumbnail")
    assert r.status_code == 409 and "captioned" in r.get_data(as_text=True)
    spawned = []
    real_bounded = thumbnails.render_bounded
    monkeypatch.setattr(thumbnails, "render_bounded", lambda *a: spawned.append(1) or real_bounded(*a))
    caption_queued(app, SURE, needs_review=False)
    assert client.get("/images/1/thumbnail").status_code == 200
    assert calls == [] and spawned == [1]  # decoded in the child process, not here
    # a photo that cannot be rendered: its bytes replaced by junk after the worker read them
    [original] = list((Path(app_settings.storage) / "sha256").rglob("*"))[-1:]
    original.write_bytes(b"\xff\xd8\xff\xe0 junk")
    first = client.get("/images/1/preview")
    assert first.status_code == 422 and spawned == [1, 1]
    assert client.get("/images/1/preview").status_code == 422 and spawned == [1, 1]  # remembered, not decoded again
