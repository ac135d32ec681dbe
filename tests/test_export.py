"""Export for CMS imports on both databases: JSON lines and CSV that read back to what was
written (quotes, commas, newlines, any script), a state per alt text, one tenant's captions only,
streamed rather than built in memory."""
import csv
import io
import json

import pytest
from click.testing import CliRunner

from conftest import keyed, make_key  # a sibling: tests/ is on sys.path
from sqlalchemy import delete

from captioner.core import export, queries
from captioner.cli import cli
from captioner.core.db import make_engine, make_sessionmaker
from captioner.core.queries import NewImage, Result
from captioner.core.settings import Settings, get_settings
from captioner.core.tables import AltTextDecision, Caption

VERSION = "export-test"
# key, caption, alt text, needs review, tenant
ROWS = [
    ("s3://bucket/a, b.jpg", 'A "quoted" dog, on grass', "A dog,\non grass; 'single' quotes", False, "default"),
    ("file:///photos/ñandú 狗.jpg", "Un ñandú 🐦 = ok", "=SUM(A1) looks like a formula", True, "default"),
    ("s3://bucket/other.jpg", "Another tenant's photo", "Not exported for default", False, "b"),
]
QUALITY = {ROWS[0][0]: 0.8125, ROWS[2][0]: 0.25}  # the model's estimate; none for the second (no estimator)


@pytest.fixture(scope="module")
def database(each_database):
    url, sm = each_database
    for key, caption, alt, review, tenant in ROWS:
        with sm.begin() as s:
            [sub] = queries.submit(s, [NewImage(key, f"fp:{key}", "ab" * 32, 123)], VERSION, "interactive",
                                   tenant=tenant)
            [claimed] = queries.claim(s, VERSION, 60, 1, job_ids=[sub.job_id])
            queries.complete(s, [Result(claimed, caption, alt, [(caption, 0.5), ("a dog", 0.25)],
                                        [("dog, \"good\"", 0.75)], 0.5, review, 640, 480, quality=QUALITY.get(key))],
                             [], VERSION, 1)
    return url


def expected(tenant: str = "default") -> list[dict]:
    return [{"key": key, "caption": caption, "alt_text": alt, "state": "needs_review" if review else "generated"}
            for key, caption, alt, review, t in ROWS if t == tenant]


def picked(rows: list[dict]) -> list[dict]:
    return [{k: r[k] for k in ("key", "caption", "alt_text", "state")} for r in rows]


@pytest.fixture(scope="module")
def client(database, tmp_path_factory):
    from captioner.api import create_app

    checkpoint = tmp_path_factory.mktemp("ckpt") / "fake.pt"
    checkpoint.write_bytes(b"not really a checkpoint")
    app = create_app(Settings(database_url=database, storage=str(tmp_path_factory.mktemp("store")),
                              model_path=str(checkpoint)))
    app.config["TESTING"] = True
    yield keyed(app, make_key(database))
    app.extensions["captioner"].sessionmaker.kw["bind"].dispose()  # before the database is dropped


def test_api_jsonl_round_trip(client):
    response = client.get("/v1/export")
    assert response.status_code == 200 and response.mimetype == "application/x-ndjson"
    assert response.is_streamed  # written row by row, never one string in memory
    rows = [json.loads(line) for line in response.get_data(as_text=True).splitlines()]
    assert picked(rows) == expected()
    assert list(rows[0]) == export.FIELDS
    assert rows[0]["tags"] == [{"label": 'dog, "good"', "score": 0.75}] and rows[0]["width"] == 640
    assert [r["quality"] for r in rows] == [0.8125, None]


def test_api_csv_round_trip(client):
    response = client.get("/v1/export?format=csv")
    assert response.status_code == 200 and response.mimetype == "text/csv" and response.is_streamed
    assert "attachment" in response.headers["Content-Disposition"]
    reader = csv.DictReader(io.StringIO(response.get_data(as_text=True), newline=""))
    rows = list(reader)
    assert reader.fieldnames == export.FIELDS
    assert picked(rows) == expected()
    assert json.loads(rows[0]["tags"]) == [{"label": 'dog, "good"', "score": 0.75}]
    assert rows[1]["needs_review"] == "True"
    assert [r["quality"] for r in rows] == ["0.8125", ""]  # no estimate: an empty cell


def test_api_export_filters_and_refuses_bad_arguments(client):
    assert client.get("/v1/export?model_version=nope").get_data(as_text=True) == ""
    assert client.get("/v1/export?format=csv&model_version=nope").get_data(as_text=True).count("\n") == 1  # header
    response = client.get("/v1/export?format=xml")
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "invalid_request"


def test_records_are_one_tenants_and_streamed(database):
    engine = make_engine(database)
    with make_sessionmaker(engine)() as s:
        rows = export.records(s, "b")
        assert iter(rows) is rows  # a generator: the caller pulls rows as it writes them
        assert picked(list(rows)) == expected("b")
        assert list(export.records(s, "nobody")) == []
    engine.dispose()


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_cli_export(database, fmt, monkeypatch, tmp_path):
    monkeypatch.setenv("CAPTIONER_DATABASE_URL", database)
    get_settings.cache_clear()
    try:
        out = tmp_path / f"captions.{fmt}"
        result = CliRunner().invoke(cli, ["export", "--format", fmt, "--output", str(out), "--tenant", "b"])
        assert result.exit_code == 0, result.output
    finally:
        get_settings.cache_clear()
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f)) if fmt == "csv" else [json.loads(line) for line in f]
    assert picked(rows) == expected("b")


def test_one_record_per_image_newest_caption_and_a_persons_decision_first(database):
    """A re-caption adds a caption beside the old one: the export has the image once, with the
    newest caption; a person's alt-text decision is exported instead of the model's suggestion."""
    from captioner.core import alttext

    engine = make_engine(database)
    sm = make_sessionmaker(engine)
    key = ROWS[0][0]
    with sm.begin() as s:
        [sub] = queries.submit(s, [NewImage(key, f"fp:{key}", "ab" * 32, 123)], "newer-model", "backfill")
        [claimed] = queries.claim(s, "newer-model", 60, 1, job_ids=[sub.job_id])
        queries.complete(s, [Result(claimed, "A dog on grass", "A dog on grass.", [("A dog on grass", 0.9)], [],
                                    0.9, False, 640, 480)], [], "newer-model", 1)
    with sm() as s:
        rows = [r for r in export.records(s, "default") if r["key"] == key]
        assert [(r["caption"], r["state"], r["model_version"]) for r in rows] == [
            ("A dog on grass", "generated", "newer-model")]
        assert [r["caption"] for r in export.records(s, "default", VERSION) if r["key"] == key] == [ROWS[0][1]]
        alttext.decide(s, sub.image_id, "edited", "A collie lies on a lawn.", "key cap_test", "default")
        s.commit()
        [row] = [r for r in export.records(s, "default") if r["key"] == key]
        assert (row["alt_text"], row["state"], row["caption"]) == ("A collie lies on a lawn.", "edited", "A dog on grass")
        s.execute(delete(AltTextDecision).where(AltTextDecision.image_id == sub.image_id))
        s.execute(delete(Caption).where(Caption.model_version == "newer-model"))
        s.commit()
    engine.dispose()


def test_an_upload_is_exported_by_its_file_name(client, database):
    """The key of an upload is the name it was sent with, not its content-addressed storage key;
    the same bytes sent again under another name keep the first."""
    for name in ("Holiday 2024/beach.jpg", "renamed.jpg"):
        r = client.post("/v1/images", data={"file": (io.BytesIO(_png()), name)})
        assert r.status_code == 202, r.get_json()
    version = client.application.extensions["captioner"].current_model_version()  # the fake checkpoint's
    engine = make_engine(database)
    with make_sessionmaker(engine).begin() as s:
        [claimed] = queries.claim(s, version, 60, 10)
        queries.complete(s, [Result(claimed, "A beach", "A beach.", [("A beach", 0.9)], [], 0.9, False, 8, 8)], [],
                         version, 1)
    engine.dispose()
    rows = [json.loads(line) for line in client.get("/v1/export").get_data(as_text=True).splitlines()]
    [row] = [r for r in rows if r["model_version"] == version]
    assert row["key"] == "beach.jpg" and row["caption"] == "A beach"


def _png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(out, "PNG")
    return out.getvalue()
