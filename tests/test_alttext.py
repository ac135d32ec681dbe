"""Alt text for a CMS through the API on PostgreSQL: suggestions, people's decisions, history, and
a later model that only adds a suggestion."""
import pytest
from conftest import keyed, make_key  # siblings: tests/ is on sys.path
from test_api import assert_error

from captioner.api import create_app
from captioner.core import queries
from captioner.core.alttext import lint
from captioner.core.queries import NewImage, Result
from captioner.core.settings import Settings

OLD, NEW = "oldmodel0001", "newmodel0002"


@pytest.fixture
def app(own_pg_url, tmp_path, fake_checkpoint):
    app = create_app(Settings(database_url=own_pg_url, storage=str(tmp_path / "store"),
                              model_path=str(fake_checkpoint)))
    app.config["TESTING"] = True
    app.config["DATABASE_URL"] = own_pg_url
    app.config["API_KEY"] = make_key(own_pg_url)
    return app


def editor(app) -> str:
    """Who the API records for the fixture's key: its public part, never the key."""
    return "key " + "_".join(app.config["API_KEY"].split("_")[:2])


def caption(app, image_id: int, version: str, alt: str, confidence: float, quality: float | None = None) -> None:
    """A model's result for the image, written as a worker writes it."""
    sm = app.extensions["captioner"].sessionmaker
    with sm.begin() as s:
        uri = f"file:///photos/{image_id}.jpg"
        [sub] = queries.submit(s, [NewImage(uri, f"sha256:{image_id:064d}")], version, "backfill")
        [claimed] = queries.claim(s, version, 60, 1, job_ids=[sub.job_id])
        queries.complete(s, [Result(claimed, alt.rstrip("."), alt, [(alt, confidence)], [("dog", 0.9)], confidence,
                                    confidence < 0.35, 64, 48, quality)], [], version, forward_size=1)


def new_image(app, n: int) -> int:
    sm = app.extensions["captioner"].sessionmaker
    with sm.begin() as s:
        [sub] = queries.submit(s, [NewImage(f"file:///photos/{n}.jpg", f"sha256:{n:064d}")], OLD, "backfill")
    return sub.image_id


def test_a_person_decides_and_a_newer_model_only_adds_a_suggestion(app):
    client = keyed(app, app.config["API_KEY"])
    image_id = new_image(app, 1)
    caption(app, 1, OLD, "A dog runs on the grass.", 0.2)
    body = client.get(f"/v1/images/{image_id}").get_json()
    assert body["alt_text"] == "A dog runs on the grass." and body["alt_text_state"] == "needs_review"
    assert body["quality"] is None  # this model had no quality estimator

    r = client.patch(f"/v1/images/{image_id}/alt-text", json={"state": "edited", "text": "  A brown dog runs.  "})
    assert r.status_code == 200, r.get_json()
    decided = r.get_json()
    assert (decided["text"], decided["state"], decided["by"]) == ("A brown dog runs.", "edited", editor(app))
    assert decided["warnings"] == []

    caption(app, 1, NEW, "A dog is running through a field.", 0.8, quality=0.875)  # a re-caption by a newer model
    body = client.get(f"/v1/images/{image_id}").get_json()
    assert (body["model_version"], body["confidence"], body["quality"]) == (NEW, 0.8, 0.875)
    assert body["alt_text"] == "A brown dog runs." and body["alt_text_state"] == "edited"
    assert body["alt_text_suggestion"]["text"] == "A dog is running through a field."
    assert body["alt_text_suggestion"]["state"] == "generated" and body["alt_text_suggestion"]["model_version"] == NEW
    history = client.get(f"/v1/images/{image_id}/alt-text/history").get_json()["history"]
    assert [(h["state"], h["model_version"], h["by"]) for h in history] == [
        ("needs_review", OLD, None), ("edited", OLD, editor(app)), ("generated", NEW, None)]

    # approving with no text approves the newest suggestion; the older decision stays in the history
    approved = client.patch(f"/v1/images/{image_id}/alt-text", json={"state": "approved"}).get_json()
    assert (approved["text"], approved["state"], approved["model_version"]) == (
        "A dog is running through a field.", "approved", NEW)
    decorative = client.patch(f"/v1/images/{image_id}/alt-text", json={"state": "decorative", "text": ""}).get_json()
    assert (decorative["text"], decorative["state"]) == ("", "decorative")
    view = client.get(f"/v1/images/{image_id}/alt-text").get_json()
    assert view["text"] == "" and view["state"] == "decorative" and len(view["history"]) == 5
    assert view["at"] and view["by"] == editor(app)


def test_bad_decisions_are_clear_errors(app):
    client = keyed(app, app.config["API_KEY"])
    image_id = new_image(app, 2)
    url = f"/v1/images/{image_id}/alt-text"
    body = assert_error(client.patch(url, json={"state": "approved"}), 409, "not_captioned")
    assert "no caption yet" in body["error"]["message"]
    caption(app, 2, OLD, "A cat sleeps.", 0.9)
    assert_error(client.patch("/v1/images/999999/alt-text", json={"state": "approved"}), 404, "not_found")
    assert "unknown field alt" in assert_error(client.patch(url, json={"state": "edited", "alt": "x"}), 400,
                                               "invalid_request")["error"]["message"]
    assert_error(client.patch(url, json={"state": "generated"}), 400, "invalid_request")
    assert_error(client.patch(url, json={"state": "needs_review"}), 400, "invalid_request")
    assert_error(client.patch(url, json={"text": "A cat."}), 400, "invalid_request")
    assert_error(client.patch(url, json={"state": ["edited"]}), 400, "invalid_request")
    assert_error(client.patch(url, json={"state": "decorative", "text": "A cat."}), 400, "invalid_request")
    assert_error(client.patch(url, json={"state": "edited"}), 400, "invalid_request")
    assert_error(client.patch(url, json={"state": "edited", "text": "   "}), 400, "invalid_request")
    assert_error(client.patch(url, json={"state": "edited", "text": 5}), 400, "invalid_request")
    assert_error(client.patch(url, json={"state": "decorative", "text": None}), 400, "invalid_request")
    assert_error(client.patch(url, json={"state": "edited", "text": "x" * 1001}), 400, "invalid_request")
    assert_error(client.patch(url, json={"state": "edited", "text": " " + "x" * 1000}), 400, "invalid_request")
    assert_error(client.patch(url, json={"state": "edited", "text": "a\x00b"}), 400, "invalid_request")
    assert_error(client.patch(url, json={"state": "edited", "text": "two\nlines"}), 400, "invalid_request")
    assert_error(client.patch(url, json={"state": "approved", "text": "Something else."}), 400, "invalid_request")
    assert_error(client.patch(url, data="state=approved"), 415, "unsupported_media_type")
    assert client.patch(url, json={"state": "edited", "text": "x" * 1000}).status_code == 200
    # nothing refused above was recorded
    assert [h["state"] for h in client.get(f"{url}/history").get_json()["history"]] == ["generated", "edited"]


def test_another_tenants_image_is_not_found(app):
    image_id = new_image(app, 3)
    caption(app, 3, OLD, "A bird.", 0.9)
    client = keyed(app, make_key(app.config["DATABASE_URL"], tenant="someone-else"))
    assert_error(client.get(f"/v1/images/{image_id}/alt-text"), 404, "not_found")
    assert_error(client.patch(f"/v1/images/{image_id}/alt-text", json={"state": "approved"}), 404, "not_found")


def test_lint_names_what_guidance_advises_against():
    assert lint("A dog on a beach.") == []
    assert len(lint("Image of a dog on IMG_0042.jpg")) == 2
    assert "longer than 125" in lint("A dog " * 30)[0]
