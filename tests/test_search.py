"""Caption search on both back-ends (PostgreSQL full-text, SQLite FTS5), through the real write
path (submit, claim, complete) and the real API: stemming, phrases, exclusions, ranking, paging,
tenants, and hostile queries that must be a 400 or results, never a 500."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from captioner.core import queries, search
from captioner.cli import cli
from captioner.core.db import make_engine, make_sessionmaker
from captioner.core.errors import InvalidRequest
from captioner.core.queries import NewImage, Result
from captioner.core.settings import Settings, get_settings
from captioner.migrations import upgrade
from conftest import keyed, make_key  # a sibling: tests/ is on sys.path

VERSION = "search-test"
# (key, caption, alt text, tags, tenant): the alt text differs from the caption where a test needs it
CORPUS = [
    ("dog-grass", "A dog runs on the grass.", "A dog running on green grass.", [("golden retriever", 0.8)], "default"),
    ("dogs-snow", "Two dogs are playing in the snow.", "Two dogs playing in snow.", [("husky", 0.6)], "default"),
    ("cat-sofa", "A black cat sleeping on a sofa.", "A black cat asleep on a sofa.", [("tabby", 0.7)], "default"),
    ("dog-cat", "A dog and a cat sit on the grass.", "A dog and a cat on grass.", [("beagle", 0.5)], "default"),
    ("bike", "A man riding a bike down a hill.", "A cyclist on a hill.", [("mountain bike", 0.9)], "default"),
    ("sled", "People in red jackets stand in the snow.", "People in red jackets.", [("dogsled", 0.4),
                                                                                    ("dog", 0.3)], "default"),
    ("cafe", "People outside a café in the sun.", "People outside a café.", [("restaurant", 0.6)], "default"),
    ("grass-dog", "Grass is green and a dog is near.", "Green grass, a dog.", [("lawn mower", 0.2)], "default"),
    ("other-tenant", "A dog sits on the grass in a garden.", "A dog in a garden.", [("collie", 0.9)], "b"),
]
HOSTILE = ['"', '"dog', 'dog"', '""', '" "', "(dog", "dog)", "NEAR(dog cat)", "NEAR", "dog*", "*", "caption:dog",
           "alt_text:dog", "dog & cat | !bird", "!!dog", "dog <-> cat", "dog:*", "-", "--dog", "-dog", "- dog",
           "AND", "OR", "NOT dog", "dog OR cat", "^dog", "{dog}", "'", "\\", "%", "_", "dog's", "ñandú 狗 🐶",
           "🐶", "\u200b", "dog\u0301", "+dog", "dog~2", "[dog]", "dog;DROP TABLE captions", "a" * 200]


def seed(sm) -> dict[str, int]:
    """The corpus, written the way workers write captions. Returns image id per key."""
    out = {}
    for key, caption, alt, tags, tenant in CORPUS:
        with sm.begin() as s:
            [sub] = queries.submit(s, [NewImage(f"file:///photos/{key}.jpg", f"sha256:{key}")], VERSION,
                                   "interactive", tenant=tenant)
            # claimed by hand: search tests seed jobs and captions directly
            claimed = queries.Claimed(sub.job_id, sub.image_id, f"file:///photos/{key}.jpg", 1)
            # one caption has a quality estimate, the others come from a model without an estimator
            quality = 0.75 if key == "dog-grass" else None
            queries.complete(s, [Result(claimed, caption, alt, [(caption, 0.5)], tags, 0.5, key == "sled", 8, 8,
                                        quality)],
                             [], VERSION, forward_size=1)
        out[key] = sub.image_id
    return out


@pytest.fixture(scope="module")
def backend(each_database):
    """(database url, sessionmaker, ids by key) with the corpus written once per back-end."""
    url, sm = each_database
    return url, sm, seed(sm)


def found(backend, query: str, limit: int = 50, offset: int = 0, tenant: str = "default") -> list[str]:
    _, sm, ids = backend
    keys = {v: k for k, v in ids.items()}
    with sm() as s:
        return [keys[r["id"]] for r in search.query_index(s, query, limit, offset, tenant)]


def test_stemming_finds_other_forms_of_a_word(backend):
    assert set(found(backend, "dogs")) >= {"dog-grass", "dogs-snow", "dog-cat", "grass-dog", "sled"}
    assert set(found(backend, "running")) == {"dog-grass"}  # "runs" in the caption, "running" in the alt text
    assert set(found(backend, "sleeps")) == {"cat-sofa"}


def test_every_word_must_match_in_caption_alt_text_or_tags(backend):
    assert set(found(backend, "dog grass")) == {"dog-grass", "dog-cat", "grass-dog"}
    assert found(backend, "cyclist") == ["bike"]  # alt text only
    assert found(backend, "retriever") == ["dog-grass"]  # a tag label only
    assert found(backend, "giraffe") == []


def test_quoted_phrase_keeps_word_order(backend):
    assert set(found(backend, '"dog runs"')) == {"dog-grass"}
    assert set(found(backend, '"black cat"')) == {"cat-sofa"}
    assert found(backend, '"cat black"') == []


def test_exclusions(backend):
    assert set(found(backend, "dog grass -cat")) == {"dog-grass", "grass-dog"}
    assert set(found(backend, 'grass -"a cat"')) == {"dog-grass", "grass-dog"}
    assert found(backend, "snow -dogs") == []  # the photo of the sled has a "dog" tag
    assert found(backend, "-dog") == []  # exclusions alone match nothing


def test_caption_matches_rank_above_tag_matches(backend):
    ranked = found(backend, "dog")
    assert ranked[-1] == "sled", ranked  # "dog" is only among its tags
    _, sm, _ = backend
    with sm() as s:
        scores = [r["score"] for r in search.query_index(s, "dog", 50)]
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[-1]


def test_paging_walks_the_same_order(backend):
    everything = found(backend, "dog")
    pages = [found(backend, "dog", limit=2, offset=o) for o in range(0, len(everything) + 2, 2)]
    assert [k for page in pages for k in page] == everything
    assert pages[-1] == []


def test_another_tenants_captions_never_appear(backend):
    assert "other-tenant" not in found(backend, "dog garden collie")
    assert found(backend, "garden") == []
    assert found(backend, "garden", tenant="b") == ["other-tenant"]
    assert found(backend, "dog", tenant="nobody") == []


@pytest.mark.parametrize("query", HOSTILE)
def test_hostile_queries_are_results_or_invalid_never_errors(backend, query):
    _, sm, _ = backend
    with sm() as s:
        try:
            rows = search.query_index(s, query, 10)
        except InvalidRequest as e:
            assert e.message
        else:
            assert isinstance(rows, list)


@pytest.mark.parametrize("query", ["", "   ", "*", "()", '"', "-", "🐶", "a\x00b", "a" * 201, "dog " * 2500])
def test_queries_without_words_too_long_or_with_nul_are_refused(backend, query):
    _, sm, _ = backend
    with sm() as s, pytest.raises(InvalidRequest):
        search.query_index(s, query, 10)


def test_parse():
    assert search.parse('Dogs "Running on" -cat -"a b" NEAR(x) col:y') == [
        search.Term(("dogs",)), search.Term(("running", "on")), search.Term(("cat",), True),
        search.Term(("a", "b"), True), search.Term(("near", "x")), search.Term(("col", "y"))]
    assert search.parse('"unclosed phrase') == [search.Term(("unclosed", "phrase"))]
    assert search.parse("dog dog") == [search.Term(("dog",))]


# ------------------------------------------------------------------ the API and the CLI


@pytest.fixture(scope="module")
def api(backend, tmp_path_factory):
    from captioner.api import create_app

    url, _, ids = backend
    checkpoint = tmp_path_factory.mktemp("ckpt") / "fake.pt"
    checkpoint.write_bytes(b"not really a checkpoint")
    app = create_app(Settings(database_url=url, storage=str(tmp_path_factory.mktemp("store")),
                              model_path=str(checkpoint)))
    app.config["TESTING"] = True
    yield keyed(app, make_key(url)), ids
    app.extensions["captioner"].sessionmaker.kw["bind"].dispose()  # before the database is dropped


def assert_400(response):
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.get_json()["error"]["code"] == "invalid_request"


def test_api_search_results_and_pages(api):
    client, ids = api
    body = client.get("/v1/search", query_string={"q": "dogs -cat", "limit": 2}).get_json()
    assert body["query"] == "dogs -cat" and len(body["results"]) == 2 and body["next_offset"] == 2
    first = body["results"][0]
    assert set(first) == {"id", "source", "caption", "alt_text", "tags", "score", "confidence", "quality",
                          "model_version"}
    assert first["tags"][0].keys() == {"label", "score"} and first["source"].endswith(".jpg")
    assert "/" not in first["source"]  # a local file by its name: never the server's folders
    seen = [r["id"] for r in body["results"]]
    offset = body["next_offset"]
    while offset is not None:
        body = client.get("/v1/search", query_string={"q": "dogs -cat", "limit": 2, "offset": offset}).get_json()
        seen += [r["id"] for r in body["results"]]
        offset = body["next_offset"]
    assert len(seen) == len(set(seen)) == 4 and ids["dog-cat"] not in seen
    quality = {r["id"]: r["quality"] for r in client.get("/v1/search", query_string={"q": "dog"}).get_json()["results"]}
    assert quality.pop(ids["dog-grass"]) == 0.75 and quality and set(quality.values()) == {None}


@pytest.mark.parametrize("query", HOSTILE)
def test_api_hostile_queries(api, query):
    client, _ = api
    response = client.get("/v1/search", query_string={"q": query})
    assert response.status_code in (200, 400), response.get_data(as_text=True)
    if response.status_code == 400:
        assert_400(response)


@pytest.mark.parametrize("args", [{}, {"q": ""}, {"q": " "}, {"q": "a" * 201}, {"q": "x" * 10_000},
                                  {"q": "dog\x00"}, {"q": "***"}, {"q": "dog", "limit": 0},
                                  {"q": "dog", "limit": 101}, {"q": "dog", "limit": "x"},
                                  {"q": "dog", "offset": -1}, {"q": "dog", "offset": 10_001},
                                  {"q": "dog", "offset": "1e3"}])
def test_api_bad_arguments_are_400(api, args):
    client, _ = api
    assert_400(client.get("/v1/search", query_string=args))


def test_cli_search(backend, monkeypatch):
    url = backend[0]
    monkeypatch.setenv("CAPTIONER_DATABASE_URL", url)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        result = runner.invoke(cli, ["search", "--json", "--", "dogs", "-cat", '"dog runs"'])
        assert result.exit_code == 0, result.output
        [line] = result.stdout.splitlines()
        assert json.loads(line)["source"] == "file:///photos/dog-grass.jpg"
        result = runner.invoke(cli, ["search", "--", "(", '"', "*"])
        assert result.exit_code == 1 and "invalid_request" in result.output
    finally:
        get_settings.cache_clear()


def test_migration_indexes_existing_captions_and_downgrades(tmp_path: Path):
    """Captions written before the search migration are found after it; it downgrades cleanly."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "5c12d53081cc")
    engine = make_engine(url)
    # the first schema's own columns, in SQL: today's insert code writes columns it lacks
    with engine.begin() as conn:
        for n, (key, caption, alt, tags, tenant) in enumerate(CORPUS, start=1):
            conn.execute(text("INSERT INTO images (id, tenant, uri, fingerprint, created_at) "
                              "VALUES (:id, :tenant, :uri, :fp, CURRENT_TIMESTAMP)"),
                         {"id": n, "tenant": tenant, "uri": f"file:///photos/{key}.jpg", "fp": f"sha256:{key}"})
            conn.execute(text("INSERT INTO captions (image_id, model_version, text, alt_text, candidates, tags, "
                              "confidence, needs_review, forward_size, created_at) VALUES (:id, :version, :text, "
                              ":alt, '[]', :tags, 0.5, 0, 1, CURRENT_TIMESTAMP)"),
                         {"id": n, "version": VERSION, "text": caption, "alt": alt, "tags": json.dumps(tags)})
    upgrade(url)
    sm = make_sessionmaker(engine)
    with sm() as s:
        assert {r["source"] for r in search.query_index(s, "retriever", 10)} == {"file:///photos/dog-grass.jpg"}
    from alembic import command

    from captioner.migrations import alembic_config
    command.downgrade(alembic_config(url), "5c12d53081cc")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM sqlite_master WHERE name LIKE 'captions_fts%'")).scalar() == 0
    engine.dispose()


def test_a_recaptioned_image_is_found_by_its_new_words_only(backend):
    _, sm, _ = backend
    for caption in ("A zebra grazing.", "A giraffe eating leaves."):  # the upsert a redelivered batch does
        with sm.begin() as s:
            [sub] = queries.submit(s, [NewImage("file:///photos/zoo.jpg", "sha256:zoo")], VERSION, "interactive",
                                   tenant="zoo")
            s.execute(text("UPDATE jobs SET status = 'queued' WHERE id = :id"), {"id": sub.job_id})
            [claimed] = queries.claim(s, VERSION, 60, 1, job_ids=[sub.job_id])
            queries.complete(s, [Result(claimed, caption, caption, [], [], 0.5, False, 8, 8)], [], VERSION, 1)
    with sm() as s:
        assert search.query_index(s, "zebra", 10, tenant="zoo") == []
        assert [r["caption"] for r in search.query_index(s, "giraffes", 10, tenant="zoo")] == [caption]


def test_an_image_captioned_by_two_models_is_found_once_by_its_newest_caption(backend):
    _, sm, _ = backend
    for version, caption in (("oldmodel", "A striped horse in a field."), ("newmodel", "A zebra in a field.")):
        with sm.begin() as s:
            [sub] = queries.submit(s, [NewImage("file:///photos/savanna.jpg", "sha256:savanna")], version, "backfill",
                                   tenant="savanna")
            [claimed] = queries.claim(s, version, 60, 1, job_ids=[sub.job_id])
            queries.complete(s, [Result(claimed, caption, caption, [], [], 0.5, False, 8, 8)], [], version, 1)
    with sm() as s:
        assert [(r["caption"], r["model_version"]) for r in search.query_index(s, "field", 10, tenant="savanna")] == [
            ("A zebra in a field.", "newmodel")]
        assert search.query_index(s, "horse", 10, tenant="savanna") == []
