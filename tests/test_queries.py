"""The job life-cycle's data functions on both databases we support."""
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import Engine, func, select, text, update

from captioner.core import queries
from captioner.core.db import make_engine, make_sessionmaker
from captioner.core.queries import Claimed, Failure, NewImage, Result
from captioner.core.tables import Caption, Job, utcnow

VERSION = "abc123def456"


def emptied(engine: Engine) -> None:
    """pg_url is one database for the session: each test leaves it empty for the next."""
    with engine.begin() as conn:
        for table in ("captions", "batch_images", "batches", "jobs", "images"):
            conn.exec_driver_sql(f"DELETE FROM {table}")


@pytest.fixture(params=["sqlite_url", "pg_url"], ids=["sqlite", "postgresql"])  # a fixture's name: see conftest
def sm(request):
    url = request.getfixturevalue(request.param)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    if request.param == "pg_url":
        emptied(engine)
    engine.dispose()


@pytest.fixture
def pg_sm(pg_url):
    """PostgreSQL alone, for transactions that run at once (SQLite has one writer at a time)."""
    engine = make_engine(pg_url)
    yield make_sessionmaker(engine)
    emptied(engine)
    engine.dispose()


def images(n: int, tag: str = "") -> list[NewImage]:
    return [NewImage(f"file:///photos/{tag}{i}.jpg", f"sha256:{tag}{i:06d}", None, 100 + i) for i in range(n)]


def result(c: Claimed, text: str = "a dog runs on the grass") -> Result:
    return Result(c, text, text.capitalize(), [(text, 0.5), ("a dog", 0.2)], [("dog", 0.9)], 0.5, False, 640, 480)


def test_submitting_the_same_images_twice_gives_the_same_jobs(sm):
    with sm.begin() as s:
        first = queries.submit(s, images(5), VERSION, "interactive")
    with sm.begin() as s:
        second = queries.submit(s, images(5) + images(5), VERSION, "backfill")
        new_model = queries.submit(s, images(5), "otherversion", "backfill")
    assert [x.job_id for x in second] == [x.job_id for x in first] * 2
    assert all(x.queue == "interactive" for x in second)  # the existing job keeps its queue
    assert {x.image_id for x in new_model} == {x.image_id for x in first}
    assert not {x.job_id for x in new_model} & {x.job_id for x in first}


def test_claim_takes_queued_jobs_once_and_drops_the_rest(sm):
    with sm.begin() as s:
        ids = [x.job_id for x in queries.submit(s, images(6), VERSION, "interactive")]
    with sm.begin() as s:
        claimed = queries.claim(s, VERSION, 60, limit=10, job_ids=ids[:4] + ids[:2])  # duplicates as from a broker
    assert [c.job_id for c in claimed] == ids[:4] and all(c.attempts == 1 for c in claimed)
    with sm.begin() as s:
        again = queries.claim(s, VERSION, 60, limit=10, job_ids=ids)
        other_model = queries.claim(s, "otherversion", 60, limit=10, job_ids=ids)
    assert [c.job_id for c in again] == ids[4:]
    assert other_model == []


def test_claim_without_ids_honours_limit_and_batch(sm):
    with sm.begin() as s:
        in_a = queries.submit(s, images(5, "a"), VERSION, "backfill")
        batch_a = queries.create_batch(s, "a", VERSION, [x.image_id for x in in_a])
        queries.submit(s, images(5, "b"), VERSION, "backfill")
    with sm.begin() as s:
        claimed = queries.claim(s, VERSION, 60, limit=3, batch_id=batch_a.id)
        rest = queries.claim(s, VERSION, 60, limit=100, batch_id=batch_a.id)
        everything_else = queries.claim(s, VERSION, 60, limit=100)
    assert len(claimed) == 3 and len(rest) == 2 and len(everything_else) == 5


def test_complete_is_idempotent_and_failures_are_per_image(sm):
    with sm.begin() as s:
        subs = queries.submit(s, images(3), VERSION, "interactive")
        batch = queries.create_batch(s, "three", VERSION, [x.image_id for x in subs])
        claimed = queries.claim(s, VERSION, 60, limit=3)
    for _ in range(2):  # a redelivered batch writes again: still one caption per image and model
        with sm.begin() as s:
            queries.complete(s, [result(claimed[0]), result(claimed[1])],
                             [Failure(claimed[2], "invalid_image", "not an image")], VERSION, forward_size=2)
    with sm() as s:
        assert s.scalar(select(func.count()).select_from(Caption)) == 2
        view = queries.image_view(s, claimed[0].image_id, VERSION)
        failed = queries.image_view(s, claimed[2].image_id, VERSION)
        counts = queries.batch_view(s, batch.id)["counts"]
        assert queries.failures_by_code(s, batch.id) == {"invalid_image": 1}
    assert view["status"] == "done" and view["caption"] == "a dog runs on the grass"
    assert view["candidates"][0] == {"text": "a dog runs on the grass", "score": 0.5}
    assert view["tags"] == [{"label": "dog", "score": 0.9}] and view["width"] == 640
    assert failed["status"] == "failed" and failed["error"] == {"code": "invalid_image", "message": "not an image"}
    assert counts == {"queued": 0, "processing": 0, "done": 2, "failed": 1}


def test_sweep_returns_expired_leases_and_fails_after_max_attempts(sm):
    with sm.begin() as s:
        ids = [x.job_id for x in queries.submit(s, images(3), VERSION, "backfill")]
        queries.claim(s, VERSION, 60, limit=3)
        past = utcnow() - timedelta(seconds=1)
        s.execute(update(Job).where(Job.id.in_(ids[:2])).values(lease_until=past))
        s.execute(update(Job).where(Job.id == ids[1]).values(attempts=3))
    with sm.begin() as s:
        republish = queries.sweep(s, max_attempts=3, requeue_after_seconds=300)
    assert [(d.job_id, d.queue) for d in republish] == [(ids[0], "backfill")]
    with sm() as s:
        status = dict(s.execute(select(Job.id, Job.status)).all())
        assert s.get(Job, ids[1]).error_code == "too_many_attempts"
    assert status == {ids[0]: "queued", ids[1]: "failed", ids[2]: "processing"}


def test_sweep_republishes_jobs_queued_too_long(sm):
    with sm.begin() as s:
        ids = [x.job_id for x in queries.submit(s, images(2), VERSION, "interactive")]
        s.execute(update(Job).where(Job.id == ids[0]).values(updated_at=utcnow() - timedelta(hours=1)))
    with sm.begin() as s:
        [bell] = queries.sweep(s, max_attempts=3, requeue_after_seconds=300)
        assert bell == (ids[0], "interactive", s.get(Job, ids[0]).image_id)  # the image id, for Flower
    with sm.begin() as s:  # touched: not published again on the next tick
        assert queries.sweep(s, max_attempts=3, requeue_after_seconds=300) == []


def test_sweep_leaves_a_backlog_alone_until_its_queue_has_drained(sm):
    """A job queued long while its broker queue still holds messages is waiting its turn: sending
    it again would add the whole backlog to the broker at every sweep. An expired lease is always
    sent again (its message was consumed)."""
    with sm.begin() as s:
        ids = [x.job_id for x in queries.submit(s, images(2, "d"), VERSION, "backfill")]
        queries.claim(s, VERSION, 60, limit=1, job_ids=ids[:1])
        s.execute(update(Job).where(Job.id == ids[0]).values(lease_until=utcnow() - timedelta(seconds=1)))
        s.execute(update(Job).where(Job.id == ids[1]).values(updated_at=utcnow() - timedelta(hours=1)))
    with sm.begin() as s:
        assert [d.job_id for d in queries.sweep(s, max_attempts=3, requeue_after_seconds=300,
                                                 drained=["interactive"])] == [ids[0]]
    with sm.begin() as s:
        assert [d.job_id for d in queries.sweep(s, max_attempts=3, requeue_after_seconds=300,
                                                 drained=["interactive", "backfill"])] == [ids[1]]


def test_release_gives_claims_back(sm):
    with sm.begin() as s:
        queries.submit(s, images(2), VERSION, "interactive")
        claimed = queries.claim(s, VERSION, 60, limit=2)
        queries.release(s, [c.job_id for c in claimed], count_attempt=False)
    with sm.begin() as s:
        again = queries.claim(s, VERSION, 60, limit=2)
    assert [c.attempts for c in again] == [1, 1]


def test_concurrent_claims_never_share_a_job(pg_sm):
    """Two open transactions claim at once: SKIP LOCKED hands each its own rows, without waiting."""
    with pg_sm.begin() as s:
        queries.submit(s, images(10, "c"), VERSION, "backfill")
    with pg_sm() as first, pg_sm() as second, first.begin(), second.begin():
        a = queries.claim(first, VERSION, 60, limit=6)
        b = queries.claim(second, VERSION, 60, limit=6)
    assert len(a) == 6 and len(b) == 4
    assert not {c.job_id for c in a} & {c.job_id for c in b}


def waiting_on_a_lock(engine: Engine) -> bool:
    with engine.connect() as conn:  # a connection of its own: pg_stat_activity is fixed for a transaction
        return bool(conn.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                     " AND datname = current_database()")))


def test_a_page_racing_another_for_the_same_image_still_gets_its_row(pg_sm):
    """Two backfills of overlapping prefixes at once: the second's insert waits on the first's
    uncommitted image row, then skips it (ON CONFLICT DO NOTHING); its lookup must still find the
    row once the first commits, or the second batch silently lacks that image."""
    def second_page() -> tuple[int, list[tuple[int, str]]]:
        with pg_sm.begin() as s:
            batch = queries.create_batch(s, "second", VERSION, [])
            return queries.enqueue_page(s, batch.id, images(1, "race"), VERSION, "backfill")

    with pg_sm() as first, ThreadPoolExecutor(1) as pool:
        with first.begin():
            batch = queries.create_batch(first, "first", VERSION, [])
            assert queries.enqueue_page(first, batch.id, images(1, "race"), VERSION, "backfill")[0] == 1
            racing = pool.submit(second_page)
            deadline = time.monotonic() + 30
            while not waiting_on_a_lock(pg_sm.kw["bind"]):
                assert time.monotonic() < deadline and not racing.done(), "the second page never waited"
                time.sleep(0.05)
        added, created = racing.result(timeout=30)
    assert (added, created) == (1, [])  # a member of the second batch; the first's job serves it
