"""Whole-library backfills on real services: an S3 prefix (SeaweedFS) enqueued page by page into
PostgreSQL with bulk inserts and doorbells on Redis, re-submission without duplicate work,
progress, and re-captioning a library for a new model."""
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import redis
from sqlalchemy import event, func, select

from captioner.api import create_app
from captioner.core import queries, storage
from captioner.core.db import make_engine
from captioner.core.queries import Result
from captioner.core.settings import Settings
from captioner.core.tables import Job
from conftest import keyed, make_key  # a sibling: tests/ is on sys.path

KEYS = 3000
PAGE = 1000  # S3 lists 1,000 keys a page
JPEG_START = b"\xff\xd8\xff\xe0"


@pytest.fixture(scope="module")
def settings(own_pg_url, redis_url, s3, tmp_path_factory) -> Settings:
    fake = tmp_path_factory.mktemp("model") / "fake.pt"
    fake.write_bytes(b"a checkpoint only hashed here")
    return Settings(database_url=own_pg_url, broker_url=redis_url, storage=str(tmp_path_factory.mktemp("store")),
                    model_path=str(fake), batch_size=16)


@pytest.fixture(scope="module")
def library(s3) -> str:
    """KEYS small objects under one prefix (and a few that are not images), uploaded once."""
    bucket, client = s3["S3_TEST_BUCKET"], storage.s3_client()
    # a prefix of its own: the session's bucket is shared with test_distributed's library/
    keys = [f"backfill-library/{n:05d}.jpg" for n in range(KEYS)] + [f"backfill-library/notes-{n}.txt"
                                                                      for n in range(5)]
    with ThreadPoolExecutor(16) as pool:
        # a JPEG's first bytes (the enqueue reads no further); the text files are not images
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=(b"" if k.endswith(".txt") else JPEG_START)
                                                  + k.encode()), keys))
    return bucket


@pytest.fixture
def broker(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.delete("backfill")
    yield client
    client.delete("backfill")  # no worker runs here: leave no doorbells for another test's worker


def test_a_prefix_is_enqueued_page_by_page_with_bulk_inserts(settings, library, broker):
    app = create_app(settings)
    engine = app.extensions["captioner"].sessionmaker.kw["bind"]
    inserts: list[tuple[str, object]] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:
        words = statement.split()
        if "INSERT" in words:
            inserts.append((words[words.index("INSERT") + 2], parameters))

    event.listen(engine, "before_cursor_execute", count)
    client = keyed(app, make_key(settings.database_url, buckets=(f"s3://{library}/backfill-library/",)))
    started = time.perf_counter()
    r = client.post("/v1/batches", json={"s3": {"bucket": library, "prefix": "backfill-library/"}})
    elapsed = time.perf_counter() - started
    assert r.status_code == 202, r.get_json()
    body = r.get_json()
    assert (body["total"], body["new_jobs"], body["truncated"]) == (KEYS, KEYS, False)
    assert body["skipped"]["count"] == 5 and body["skipped"]["reasons"] == {"not_an_image": 5}
    assert body["skipped"]["keys"][0] == {"key": "backfill-library/notes-0.txt", "reason": "not_an_image"}
    print(f"\nbackfill: {KEYS} keys enqueued in {elapsed:.2f}s ({KEYS / elapsed:.0f} keys/s)")

    # one statement per table and listed page, the page's rows as arrays: never a row at a time
    tables = [table for table, _ in inserts]
    assert {t: tables.count(t) for t in set(tables)} == {"batches": 1, "images": KEYS // PAGE,
                                                         "jobs": KEYS // PAGE, "batch_images": KEYS // PAGE}
    assert [len(params["page_uri"]) for table, params in inserts if table == "images"] == [PAGE] * 3
    # doorbells carry job ids in groups of a batch: a library is not 100,000 broker round trips
    messages = (KEYS // PAGE) * -(-PAGE // settings.batch_size)  # one page's ids never share a message with another's
    assert broker.llen("backfill") == messages

    batch = client.get(body["url"]).get_json()
    assert batch["counts"] == {"queued": KEYS, "processing": 0, "done": 0, "failed": 0}
    assert batch["images_per_second"] is None and batch["eta_seconds"] is None

    # the same prefix again: a new batch over the same jobs, no new job and no new doorbell
    again = client.post("/v1/batches", json={"s3": {"bucket": library, "prefix": "backfill-library/"}}).get_json()
    assert again["id"] != body["id"] and (again["total"], again["new_jobs"]) == (KEYS, 0)
    assert broker.llen("backfill") == messages
    with make_engine(settings.database_url).connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Job)) == KEYS

    # progress: a worker finished some; the batch says how fast and how long the rest will take
    sm = app.extensions["captioner"].sessionmaker
    time.sleep(0.2)
    with sm.begin() as s:
        claimed = queries.claim(s, batch["model_version"], 60, 100, batch_id=body["id"])
        queries.complete(s, [Result(c, "a dog", "A dog.", [("a dog", 0.5)], [], 0.5, False, 1, 1) for c in claimed],
                         [], batch["model_version"], forward_size=100)
    progress = client.get(body["url"]).get_json()
    assert progress["counts"]["done"] == 100 and progress["counts"]["queued"] == KEYS - 100
    assert progress["images_per_second"] > 0
    assert progress["eta_seconds"] == pytest.approx((KEYS - 100) / progress["images_per_second"], rel=0.01)


def test_a_prefix_over_the_limit_takes_the_first_images(settings, library, broker):
    client = keyed(create_app(replace(settings, s3_prefix_limit=1500)),
                   make_key(settings.database_url, buckets=(f"s3://{library}/",)))
    body = client.post("/v1/batches", json={"s3": {"bucket": library, "prefix": "backfill-library/0"}}).get_json()
    assert (body["total"], body["truncated"]) == (1500, True)
    empty = client.post("/v1/batches", json={"s3": {"bucket": library, "prefix": "nothing-here/"}})
    assert empty.status_code == 400 and empty.get_json()["error"]["code"] == "empty_batch"
    # a prefix of objects that are not images: refused, and the answer says what was there
    text = client.post("/v1/batches", json={"s3": {"bucket": library, "prefix": "backfill-library/notes-"}})
    assert text.status_code == 400 and text.get_json()["error"]["code"] == "empty_batch"
    assert "5 objects skipped (5 not_an_image)" in text.get_json()["error"]["message"]


def test_a_prefix_takes_photos_whatever_their_names(settings, s3, broker):
    import io

    from PIL import Image
    bucket, out = s3["S3_TEST_BUCKET"], io.BytesIO()
    Image.new("RGB", (8, 6), (10, 90, 200)).save(out, "JPEG")
    names = ("IMG_1.JPG", "b.jpeg", "c.MPO", "d.jfif", "e", "f.JPG.bak")
    for key, body in [*((f"odd-names/{n}", out.getvalue()) for n in names), ("odd-names/readme.txt", b"hello"),
                      ("odd-names/cut.jpg", b"\xff\xd8"), ("odd-names/empty.jpg", b""),
                      ("odd-names/.DS_Store", b"\0\0\0\1Bud1")]:
        storage.s3_client().put_object(Bucket=bucket, Key=key, Body=body)
    client = keyed(create_app(settings), make_key(settings.database_url, buckets=(f"s3://{bucket}/odd-names/",)))
    body = client.post("/v1/batches", json={"s3": {"bucket": bucket, "prefix": "odd-names/"}}).get_json()
    assert body["total"] == 6
    assert body["skipped"] == {"count": 4, "reasons": {"empty": 1, "hidden": 1, "not_an_image": 2},
                               "keys": [{"key": "odd-names/.DS_Store", "reason": "hidden"},
                                        {"key": "odd-names/cut.jpg", "reason": "not_an_image"},
                                        {"key": "odd-names/empty.jpg", "reason": "empty"},
                                        {"key": "odd-names/readme.txt", "reason": "not_an_image"}]}


@pytest.mark.parametrize("database", ["sqlite_url", "own_pg_url"])
def test_enqueue_page_makes_each_job_once(database, request):
    """Both implementations (arrays on PostgreSQL, chunked multi-row statements on SQLite) agree."""
    from captioner.core.db import make_sessionmaker
    from captioner.core.tables import Batch

    sm = make_sessionmaker(make_engine(request.getfixturevalue(database)))
    images = [queries.NewImage(f"s3://b/page/{n}.jpg", f"s3:b/page/{n}.jpg@e{n}", None, n) for n in range(1200)]
    outcomes = []
    for source in ("first", "second"):
        with sm.begin() as s:
            batch = Batch(source=source, model_version="pagetest", total=0)
            s.add(batch)
            s.flush()
            added, new = queries.enqueue_page(s, batch.id, images + images[:10], "pagetest", "backfill")
            outcomes.append((added, len(new), {d.queue for d in new}))
        with sm() as s:
            assert s.get(Batch, batch.id).total == 1200
    assert outcomes == [(1200, 1200, {"backfill"}), (1200, 0, set())]


@pytest.mark.slow
def test_bench_backfill_uploads_the_missing_keys_and_reports_the_rate(settings, s3, broker, monkeypatch):
    """`captioner bench backfill` end to end on 2,000 keys (the 100,000-key figure in docs/benchmarks.md
    comes from the same command, run by hand: uploading 100,000 objects alone takes minutes)."""
    from click.testing import CliRunner

    from captioner.cli import cli
    from captioner.core.settings import get_settings

    for key, value in {"CAPTIONER_DATABASE_URL": settings.database_url, "CAPTIONER_BROKER_URL": settings.broker_url,
                       "CAPTIONER_MODEL_PATH": settings.model_path, "CAPTIONER_BATCH_SIZE": "32"}.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["bench", "backfill", "--bucket", s3["S3_TEST_BUCKET"], "--prefix", "bench/",
                                          "--keys", "2000"], catch_exceptions=False)
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    print("\n" + result.output)
    assert "uploaded 2000 objects" in result.output and "2000 keys enqueued" in result.output
    assert broker.llen("backfill") == 2 * -(-1000 // 32)  # doorbells in groups of a batch, per listed page
