"""The embedded default: `captioner caption` with no broker runs the whole pipeline in-process on
SQLite, through the real CLI, with the real model."""
import csv
import hashlib
import io
import json

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, select

from captioner.cli import cli
from captioner.core.settings import get_settings
from captioner.core.tables import Caption, Job


@pytest.fixture
def run(tmp_path, checkpoint, monkeypatch):
    """Invoke the CLI with the embedded settings of this test (no broker, a fresh SQLite file)."""
    env = {"CAPTIONER_DATABASE_URL": f"sqlite:///{tmp_path / 'captioner.db'}", "CAPTIONER_MODEL_PATH": str(checkpoint),
           "CAPTIONER_STORAGE": str(tmp_path / "store"), "CAPTIONER_BATCH_SIZE": "8"}
    monkeypatch.delenv("CAPTIONER_BROKER_URL", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()

    def invoke(*args: str) -> str:
        result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout

    yield invoke
    get_settings.cache_clear()


@pytest.fixture
def folder(tmp_path, photos):
    """20 real photos and one broken file, as a user's folder would hold them."""
    path = tmp_path / "photos"
    path.mkdir()
    for photo in photos[:20]:
        (path / photo.name).symlink_to(photo)
    (path / "0-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")  # sorts first
    (path / "notes.txt").write_text("not an image, and not picked up")
    return path


def test_caption_a_folder_then_resume_search_and_export(run, folder, tmp_path):
    out = run("caption", str(folder), "--limit", "10")
    assert "10 images: 9 done (9 captioned now, 0 already), 1 failed" in out
    assert "failed: 1 x invalid_image" in out

    out = run("caption", str(folder))  # the first ten are skipped: a second run resumes
    assert "21 images: 20 done (11 captioned now, 9 already), 1 failed, 0 left" in out

    engine = create_engine(f"sqlite:///{tmp_path / 'captioner.db'}")
    with engine.connect() as conn:
        captions = conn.execute(select(Caption.text, Caption.alt_text, Caption.candidates, Caption.tags,
                                       Caption.forward_size)).all()
        statuses = conn.execute(select(Job.status, Job.error_code)).all()
    engine.dispose()
    assert len(captions) == 20 and all(c.text and c.alt_text and c.candidates for c in captions)
    assert sorted(statuses).count(("done", None)) == 20 and ("failed", "invalid_image") in statuses
    assert all(c.forward_size > 1 for c in captions), [c.forward_size for c in captions]  # batched, not one by one

    out = run("caption", str(folder))
    assert "(0 captioned now, 20 already)" in out

    word = max(captions[0].text.lower().rstrip(".").split(), key=len)
    found = [json.loads(line) for line in run("search", word, "--json").splitlines()]
    assert found and all(word in r["caption"].lower() for r in found)

    rows = [json.loads(line) for line in run("export").splitlines()]
    assert len(rows) == 20 and {"caption", "alt_text", "candidates", "tags", "model_version"} <= set(rows[0])
    table = list(csv.DictReader(io.StringIO(run("export", "--format", "csv"))))
    assert len(table) == 20 and json.loads(table[0]["candidates"])[0]["text"]


def test_caption_reports_a_missing_path(run, tmp_path):
    result = CliRunner().invoke(cli, ["caption", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "no such file or folder" in result.output


def test_caption_an_s3_prefix_in_process(run, s3, photos):
    from captioner.core import storage

    bucket = s3["S3_TEST_BUCKET"]
    # names say nothing: a camera's .MPO, no extension and a renamed backup are photos, notes.jpg is not
    names = ["a.MPO", "b", "c.JPG.bak", "d.jpg"]
    for name, photo in zip(names, photos[170:174]):
        storage.s3_client().put_object(Bucket=bucket, Key=f"embedded/{name}", Body=photo.read_bytes())
    storage.s3_client().put_object(Bucket=bucket, Key="embedded/notes.jpg", Body=b"not a photo")
    storage.s3_client().put_object(Bucket=bucket, Key="embedded/.DS_Store", Body=b"\0\0\0\1Bud1")
    out = run("caption", f"s3://{bucket}/embedded/")
    assert ("2 objects skipped (1 hidden, 1 not_an_image): embedded/.DS_Store (hidden), "
            "embedded/notes.jpg (not_an_image)") in out
    assert "4 images: 4 done (4 captioned now, 0 already), 0 failed" in out
    rows = [json.loads(line) for line in run("export").splitlines()]
    assert sorted(r["key"] for r in rows) == sorted(f"s3://{bucket}/embedded/{n}" for n in names)
    # the digest is learnt where the worker reads the bytes: listing an S3 prefix cannot know it
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in photos[170:174]}
    assert sorted(r["sha256"] for r in rows) == sorted(digests.values())
