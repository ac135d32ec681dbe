"""Data functions of the job life-cycle. Each takes a Session; the caller owns the transaction."""
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Collection, Iterable, Iterator, NamedTuple

from sqlalchemy import Column, Row, Select, Table, and_, bindparam, case, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session, aliased
from sqlalchemy.orm.attributes import set_committed_value

from . import alttext, storage
from .errors import NotFound
from .tables import AltTextDecision, Batch, BatchImage, Caption, Image, Job, utcnow

CHUNK = 500  # rows per statement: stays far below SQLite's bound-parameter limit


@dataclass(frozen=True)
class NewImage:
    uri: str  # where the worker reads the bytes
    fingerprint: str  # identity for deduplication within a tenant
    sha256: str | None = None
    size: int | None = None
    name: str | None = None  # an upload's file name (storage.upload_name), shown as its source


class Doorbell(NamedTuple):
    """A job to ring for once its rows are committed; the image id is what Flower shows a person."""
    job_id: int
    queue: str
    image_id: int


@dataclass(frozen=True)
class Submitted:
    image_id: int
    job_id: int
    status: str
    queue: str


@dataclass(frozen=True)
class Claimed:
    job_id: int
    image_id: int
    uri: str
    attempts: int  # including this claim
    batch_limit: int | None = None  # the largest batch it may go in: set after a worker died with it
    sha256: str | None = None  # the image's, when known (uploads, files); an S3 object's is learnt when read


@dataclass(frozen=True)
class Result:
    """A finished caption, as core/jobs.py hands it over for writing."""
    claimed: Claimed
    text: str
    alt_text: str
    candidates: list[tuple[str, float]]
    tags: list[tuple[str, float]]
    confidence: float
    needs_review: bool
    width: int
    height: int
    quality: float | None = None  # the estimated probability that the caption is right; None without an estimator
    sha256: str | None = None  # of the bytes read, to store where the image had none


@dataclass(frozen=True)
class Failure:
    claimed: Claimed
    code: str
    message: str
    sha256: str | None = None  # of the bytes read, if they were


def _postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _insert(session: Session, table: type) -> Any:
    """INSERT with ON CONFLICT support; both our dialects have it, under different imports."""
    return (postgresql.insert if _postgresql(session) else sqlite.insert)(table)


def _chunks(items: list, size: int = CHUNK) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def submit(session: Session, images: list[NewImage], model_version: str, queue: str,
           tenant: str = "default") -> list[Submitted]:
    """Image and job rows for `images`, reusing existing ones: same tenant + fingerprint + model
    version is the same job. Returns one Submitted per input, in order. The caller commits, then
    publishes the ids whose status is queued (a duplicate message is harmless: claim drops it)."""
    now = utcnow()
    image_ids = add_images(session, images, tenant, now)
    ids = list(dict.fromkeys(image_ids[i.fingerprint] for i in images))
    add_jobs(session, ids, model_version, queue, now)
    jobs: dict[int, tuple[int, str, str]] = {}
    for among in _among(session, Job.image_id, ids):
        found = session.execute(select(Job.image_id, Job.id, Job.status, Job.queue).where(
            Job.model_version == model_version, among))
        jobs.update({image_id: (job_id, status, q) for image_id, job_id, status, q in found})
    return [Submitted(image_ids[i.fingerprint], *jobs[image_ids[i.fingerprint]]) for i in images]


# The one way images, jobs and batch memberships are inserted, for uploads, folders, S3 prefixes
# and re-captioning alike: bulk INSERT ... ON CONFLICT DO NOTHING, never a statement per row.

def _insert_new(session: Session, table: Table, columns: dict[str, list], same: dict[str, Any],
                conflict: list[str] | None, returning: list[Column]) -> list[Row]:
    """Insert the rows of `columns` (name: one value per row), each with the values of `same`, that
    do not conflict -> `returning` of those inserted. On PostgreSQL each column travels as one array
    through unnest(): a statement of a few parameters, rendered and planned once whatever the number
    of rows (per-row rendering, then dumping repeated values, was most of a page's time). SQLite
    gets multi-row VALUES, CHUNK rows a statement."""
    count = len(next(iter(columns.values())))
    if count == 0:
        return []
    if _postgresql(session):
        page = func.unnest(*[bindparam(f"page_{n}", values, type_=ARRAY(table.c[n].type))
                             for n, values in columns.items()]).table_valued(*columns).render_derived(name="page")
        constants = [bindparam(f"same_{n}", value, type_=table.c[n].type) for n, value in same.items()]
        return session.execute(
            postgresql.insert(table).from_select([*columns, *same], select(*[page.c[n] for n in columns], *constants))
            .on_conflict_do_nothing(index_elements=conflict).returning(*returning)).all()
    rows = [{**dict(zip(columns, values)), **same} for values in zip(*columns.values())]
    out: list[Row] = []
    for chunk in _chunks(rows):
        out += session.execute(sqlite.insert(table).on_conflict_do_nothing(index_elements=conflict)
                               .returning(*returning), chunk).all()
    return out


def _among(session: Session, column: Any, values: list) -> Iterator[Any]:
    """WHERE clauses for `column` IN `values`. PostgreSQL gets `IN (SELECT unnest(array))`: psycopg
    prepares a statement it has run five times, and the generic plans of a long IN list and of
    `= ANY(array)` were sequential scans (a backfill page's lookup grew from 0.03 to 0.4 s over 12
    pages); a semi-join with unnest() stays an index lookup. No values, no clause: nothing to look up."""
    if values and _postgresql(session):
        yield column.in_(select(func.unnest(bindparam(None, values, type_=ARRAY(column.type)))))
        return
    for chunk in _chunks(values):
        yield column.in_(chunk)


def add_images(session: Session, images: list[NewImage], tenant: str, now: datetime) -> dict[str, int]:
    """Image rows for those new to the tenant -> fingerprint: image id, for every one of `images`."""
    images_t = Image.__table__
    ids: dict[str, int] = dict(_insert_new(
        session, images_t, {"uri": [i.uri for i in images], "fingerprint": [i.fingerprint for i in images],
                            "sha256": [i.sha256 for i in images], "size": [i.size for i in images],
                            "name": [i.name for i in images]},
        {"tenant": tenant, "created_at": now}, ["tenant", "fingerprint"], [images_t.c.fingerprint, images_t.c.id]))
    # Only the images the tenant had already are looked up: a first listing costs one statement.
    # The lookup stays a statement of its own, not a CTE beside the insert: ON CONFLICT skips a row
    # that another transaction committed while the insert waited on it, and only a later statement's
    # snapshot sees that row (test_a_page_racing_another_for_the_same_image_still_gets_its_row).
    known = list(dict.fromkeys(i.fingerprint for i in images if i.fingerprint not in ids))
    for among in _among(session, images_t.c.fingerprint, known):  # table columns: plain rows, no ORM loading
        ids.update(session.execute(select(images_t.c.fingerprint, images_t.c.id)
                                   .where(images_t.c.tenant == tenant, among)).all())
    return ids


def add_jobs(session: Session, image_ids: list[int], model_version: str, queue: str,
             now: datetime) -> list[Doorbell]:
    """Queued jobs for the images that have none for this model -> doorbells of those made now:
    only they need one; existing jobs have had theirs."""
    jobs = Job.__table__
    return [Doorbell(*row) for row in _insert_new(
        session, jobs, {"image_id": image_ids}, {"model_version": model_version, "queue": queue, "status": "queued",
                                                 "attempts": 0, "created_at": now, "updated_at": now},
        ["image_id", "model_version"], [jobs.c.id, jobs.c.queue, jobs.c.image_id])]


def add_to_batch(session: Session, batch_id: int, image_ids: list[int]) -> int:
    """Batch memberships, and the batch's total -> images new to the batch."""
    members = BatchImage.__table__
    added = len(_insert_new(session, members, {"image_id": image_ids}, {"batch_id": batch_id}, None,
                            [members.c.image_id]))
    session.execute(update(Batch).where(Batch.id == batch_id).values(total=Batch.total + added)
                    .execution_options(synchronize_session=False))
    return added


def set_callback(session: Session, job_ids: list[int], url: str) -> None:
    """The latest submission's callback wins: one job, one callback (batches carry their own)."""
    session.execute(update(Job).where(Job.id.in_(job_ids)).values(callback_url=url)
                    .execution_options(synchronize_session=False))


def create_batch(session: Session, source: str, model_version: str, image_ids: Iterable[int],
                 tenant: str = "default", callback_url: str | None = None, write_metadata: str | None = None) -> Batch:
    batch = Batch(tenant=tenant, source=source, model_version=model_version, total=0, callback_url=callback_url,
                  write_metadata=write_metadata)
    session.add(batch)
    session.flush()
    # add_to_batch counts in SQL; the object learns the count without another UPDATE or SELECT
    set_committed_value(batch, "total", add_to_batch(session, batch.id, list(dict.fromkeys(image_ids))))
    return batch


def claim(session: Session, model_version: str, lease_seconds: int, limit: int,
          job_ids: list[int] | None = None, batch_id: int | None = None) -> list[Claimed]:
    """Move up to `limit` queued jobs (among `job_ids` / the batch, if given) to processing with a
    lease, atomically. Ids already claimed, done or for another model version are dropped silently:
    duplicate broker messages are harmless. Concurrent workers never get the same job."""
    now = utcnow()
    candidates = select(Job.id).where(Job.status == "queued", Job.model_version == model_version)
    if job_ids is not None:
        candidates = candidates.where(Job.id.in_(job_ids))
    if batch_id is not None:
        candidates = candidates.where(Job.image_id.in_(
            select(BatchImage.image_id).where(BatchImage.batch_id == batch_id)))
    # SKIP LOCKED: rows another worker is claiming right now are skipped instead of waited for;
    # SQLite has no row locks (one writer at a time) and ignores the clause. A MATERIALIZED CTE,
    # not `id IN (subquery)`: PostgreSQL may re-run such a subquery and claim more than `limit`.
    chosen = (candidates.order_by(Job.id).limit(limit).with_for_update(skip_locked=True)
              .cte("chosen").prefix_with("MATERIALIZED"))
    rows = session.execute(
        update(Job)
        .where(Job.id == chosen.c.id, Job.status == "queued")
        .values(status="processing", lease_until=now + timedelta(seconds=lease_seconds),
                attempts=Job.attempts + 1, updated_at=now, claim_size=None, started_at=None)
        .returning(Job.id, Job.image_id, Job.attempts, Job.batch_limit)
        .execution_options(synchronize_session=False)).all()
    images = {image_id: (uri, sha256) for image_id, uri, sha256 in session.execute(
        select(Image.id, Image.uri, Image.sha256).where(Image.id.in_([r.image_id for r in rows]))).all()}
    return sorted((Claimed(job_id, image_id, images[image_id][0], attempts, limit, images[image_id][1])
                   for job_id, image_id, attempts, limit in rows), key=lambda c: c.job_id)


def mark_started(session: Session, job_ids: list[int]) -> None:
    """Claimed jobs whose model forward begins now: they show as processing from here on. Their
    lease is untouched: claimed, they were already no other worker's to take."""
    session.execute(update(Job).where(Job.id.in_(job_ids), Job.status == "processing").values(started_at=utcnow())
                    .execution_options(synchronize_session=False))


def visible_status(status: str, started_at: datetime | None) -> str:
    """A job's status as people see it: a claimed job waiting for its forward is still queued."""
    return "queued" if status == "processing" and started_at is None else status


# visible_status in SQL, for counts and lists
VISIBLE_STATUS = case((and_(Job.status == "processing", Job.started_at.is_(None)), "queued"), else_=Job.status)


def isolate(session: Session, claimed: list[Claimed]) -> tuple[list[Claimed], list[Doorbell]]:
    """Bisection of a batch a worker died with: when claimed jobs carry a batch limit, keep at most
    that many (those limited first) and give the rest back, uncharged -> (kept, doorbells
    to publish again). Every kept job learns its batch's size, which the sweep halves if this
    worker dies too: a poison image ends alone, and its neighbours are captioned."""
    limits = [c.batch_limit for c in claimed if c.batch_limit]
    keep = min(limits, default=len(claimed))
    ordered = sorted(claimed, key=lambda c: (c.batch_limit is None, c.job_id))
    kept, rest = ordered[:keep], [c.job_id for c in ordered[keep:]]
    release(session, rest, count_attempt=False)
    if kept:
        session.execute(update(Job).where(Job.id.in_([c.job_id for c in kept])).values(claim_size=len(kept))
                        .execution_options(synchronize_session=False))
    queues = dict(session.execute(select(Job.id, Job.queue).where(Job.id.in_(rest))).all()) if rest else {}
    images = {c.job_id: c.image_id for c in claimed}
    return sorted(kept, key=lambda c: c.job_id), [Doorbell(j, queues[j], images[j]) for j in rest]


def complete(session: Session, results: list[Result], failures: list[Failure], model_version: str,
             forward_size: int) -> None:
    """Write one forward's outcome: caption rows (upserted, so a redelivered batch leaves one row
    per image and model), jobs done or failed, and the digests of S3 images read for the first time."""
    now = utcnow()
    for chunk in _chunks(results):
        stmt = _insert(session, Caption).values([
            {"image_id": r.claimed.image_id, "model_version": model_version, "text": r.text,
             "alt_text": r.alt_text, "candidates": [list(c) for c in r.candidates],
             "tags": [list(t) for t in r.tags], "confidence": r.confidence, "quality": r.quality,
             "needs_review": r.needs_review, "forward_size": forward_size, "created_at": now} for r in chunk])
        session.execute(stmt.on_conflict_do_update(
            index_elements=["image_id", "model_version"],
            set_={c: stmt.excluded[c] for c in ("text", "alt_text", "candidates", "tags", "confidence",
                                                 "quality", "needs_review", "forward_size", "created_at")}))
        session.execute(update(Image), [{"id": r.claimed.image_id, "width": r.width, "height": r.height,
                                         "sha256": r.sha256 or r.claimed.sha256} for r in chunk])
        session.execute(update(Job).where(Job.id.in_([r.claimed.job_id for r in chunk]))
                        .values(status="done", lease_until=None, error_code=None, error_message=None,
                                updated_at=now, finished_at=now)
                        .execution_options(synchronize_session=False))
    learnt = [{"id": f.claimed.image_id, "sha256": f.sha256} for f in failures if f.sha256 and not f.claimed.sha256]
    if learnt:  # a file that is not an image still has a digest, which tells its copies apart
        session.execute(update(Image), learnt)
    if failures:
        session.execute(update(Job), [
            {"id": f.claimed.job_id, "status": "failed", "lease_until": None, "error_code": f.code,
             "error_message": f.message[:2000], "updated_at": now, "finished_at": now} for f in failures])


def release(session: Session, job_ids: list[int], count_attempt: bool) -> None:
    """Return claimed jobs to the queue now (an interrupted run, a transient fetch error)
    instead of waiting for their lease to expire."""
    for chunk in _chunks(job_ids):
        values: dict[str, Any] = {"status": "queued", "lease_until": None, "started_at": None, "updated_at": utcnow()}
        if not count_attempt:
            values["attempts"] = Job.attempts - 1
        session.execute(update(Job).where(Job.id.in_(chunk), Job.status == "processing").values(**values)
                        .execution_options(synchronize_session=False))


def sweep(session: Session, max_attempts: int, requeue_after_seconds: int,
          drained: Collection[str] | None = None) -> list[Doorbell]:
    """Expired leases go back to queued (or to failed after max_attempts claims); jobs queued
    longer than requeue_after are touched. Returns the doorbells to ring again: this is
    what makes a lost message, a flushed broker or a killed worker harmless.

    `drained`: the queues whose broker backlog is empty (None: all). A job queued long in a queue
    that still holds messages is most likely waiting its turn, not lost: publishing it again would
    add the whole backlog to the broker at every sweep. Once the queue has drained, a job still
    queued has no message left, and it is published again."""
    now = utcnow()
    expired = (Job.status == "processing", Job.lease_until < now)
    # a worker died with the job in a batch of several: back uncharged, in batches half as large
    halved = session.execute(
        update(Job).where(*expired, Job.claim_size > 1)
        .values(status="queued", lease_until=None, started_at=None, updated_at=now, attempts=Job.attempts - 1,
                batch_limit=Job.claim_size // 2, claim_size=None)
        .returning(Job.id, Job.queue, Job.image_id).execution_options(synchronize_session=False)).all()
    session.execute(update(Job).where(*expired, Job.claim_size == 1, Job.attempts >= max_attempts)
                    .values(status="failed", lease_until=None, error_code="worker_crashed",
                            error_message=f"the worker died {max_attempts} times captioning this image alone",
                            updated_at=now, finished_at=now)
                    .execution_options(synchronize_session=False))
    session.execute(update(Job).where(*expired, Job.attempts >= max_attempts)
                    .values(status="failed", lease_until=None, error_code="too_many_attempts",
                            error_message=f"claimed {max_attempts} times without finishing (worker crash or timeout)",
                            updated_at=now, finished_at=now)
                    .execution_options(synchronize_session=False))
    returned = [*halved, *session.execute(
        update(Job).where(*expired).values(status="queued", lease_until=None, started_at=None, updated_at=now)
        .returning(Job.id, Job.queue, Job.image_id).execution_options(synchronize_session=False)).all()]
    stale_where = [Job.status == "queued", Job.updated_at < now - timedelta(seconds=requeue_after_seconds)]
    if drained is not None:
        stale_where.append(Job.queue.in_(list(drained)))
    stale = session.execute(update(Job).where(*stale_where).values(updated_at=now).returning(Job.id, Job.queue, Job.image_id)
                            .execution_options(synchronize_session=False)).all()
    return [Doorbell(*row) for row in [*returned, *stale]]


def _image_row(image: Image, job: Job | None, caption: Caption | None, alt: dict[str, Any]) -> dict[str, Any]:
    error = {"code": job.error_code, "message": job.error_message} if job and job.status == "failed" else None
    return {
        "id": image.id,
        "status": visible_status(job.status, job.started_at) if job else "queued",
        "caption": caption.text if caption else None,
        "alt_text": alt["text"],  # a person's decision if any, else the newest model's suggestion
        "alt_text_state": alt["state"],
        "alt_text_suggestion": alt["suggestion"],
        "alt_text_history": alt["history"],
        "candidates": [{"text": t, "score": s} for t, s in caption.candidates] if caption else [],
        "tags": [{"label": t, "score": s} for t, s in caption.tags] if caption else [],
        "confidence": caption.confidence if caption else None,
        "quality": caption.quality if caption else None,
        "needs_review": caption.needs_review if caption else None,
        "model_version": job.model_version if job else None,
        "error": error,
        "source": storage.public_source(image.uri, image.name),
        "sha256": image.sha256,
        "size": image.size,
        "width": image.width,
        "height": image.height,
        "created_at": image.created_at.isoformat(),
        "finished_at": job.finished_at.isoformat() if job and job.finished_at else None,
    }


def image_view(session: Session, image_id: int, model_version: str | None,
               tenant: str = "default") -> dict[str, Any]:
    """One image as the API shows it: the job for `model_version` if there is one, else its latest."""
    image = session.get(Image, image_id)
    if image is None or image.tenant != tenant:
        raise NotFound(f"no image with id {image_id}")
    jobs = session.scalars(select(Job).where(Job.image_id == image_id).order_by(Job.id.desc())).all()
    job = next((j for j in jobs if j.model_version == model_version), jobs[0] if jobs else None)
    caption = session.scalars(select(Caption).where(
        Caption.image_id == image_id, Caption.model_version == job.model_version)).first() if job else None
    return _image_row(image, job, caption, alttext.view(session, image_id, tenant))


def batch_view(session: Session, batch_id: int, tenant: str = "default") -> dict[str, Any]:
    batch = session.get(Batch, batch_id)
    if batch is None or batch.tenant != tenant:
        raise NotFound(f"no batch with id {batch_id}")
    counts = dict(session.execute(
        select(VISIBLE_STATUS, func.count()).join(BatchImage, BatchImage.image_id == Job.image_id)
        .where(BatchImage.batch_id == batch_id, Job.model_version == batch.model_version)
        .group_by(VISIBLE_STATUS)).all())
    # the rate counts images finished since the batch began (earlier ones were already done), and
    # not those cancelled, which no worker spent time on
    finished, last = session.execute(
        select(func.count(), func.max(Job.finished_at)).join(BatchImage, BatchImage.image_id == Job.image_id)
        .where(BatchImage.batch_id == batch_id, Job.model_version == batch.model_version,
               Job.finished_at >= batch.created_at, func.coalesce(Job.error_code, "") != "cancelled")).one()
    left = counts.get("queued", 0) + counts.get("processing", 0)
    seconds = (last - batch.created_at).total_seconds() if last else 0.0
    rate = finished / seconds if finished and seconds > 0 else None
    return {"id": batch.id, "source": batch.source, "total": batch.total, "model_version": batch.model_version,
            "counts": {s: counts.get(s, 0) for s in ("queued", "processing", "done", "failed")},
            # the failed ones by error code, most frequent first (cancelled: see core/batches.py)
            "failures": dict(sorted(((code or "unknown", n)
                                     for code, n in failures_by_code(session, batch_id).items()),
                                    key=lambda item: (-item[1], item[0]))),
            "images_per_second": round(rate, 3) if rate else None,
            "eta_seconds": round(left / rate, 1) if rate and left else (0.0 if not left else None),
            "created_at": batch.created_at.isoformat()}


def failures_by_code(session: Session, batch_id: int) -> dict[str | None, int]:
    return dict(session.execute(
        select(Job.error_code, func.count()).join(BatchImage, BatchImage.image_id == Job.image_id)
        .join(Batch, Batch.id == BatchImage.batch_id)
        .where(BatchImage.batch_id == batch_id, Job.model_version == Batch.model_version, Job.status == "failed")
        .group_by(Job.error_code)).all())


def results_query(model_version: str | None = None) -> Select:
    """(Image, Caption, AltTextDecision or None) per captioned image, oldest image first: its newest
    caption (or the one by `model_version`) and the newest decision a person made about its alt
    text. What export streams and the embedded summary shows."""
    cap, decision = aliased(Caption), aliased(AltTextDecision)  # the subqueries' own, correlated to Image only
    newest_caption = select(func.max(cap.id)).where(cap.image_id == Image.id).correlate(Image)
    if model_version:
        newest_caption = newest_caption.where(cap.model_version == model_version)
    newest_decision = select(func.max(decision.id)).where(decision.image_id == Image.id).correlate(Image)
    return (select(Image, Caption, AltTextDecision).select_from(Image)
            .join(Caption, Caption.id == newest_caption.scalar_subquery())
            .outerjoin(AltTextDecision, AltTextDecision.id == newest_decision.scalar_subquery())
            .order_by(Image.id))


def enqueue_page(session: Session, batch_id: int, images: list[NewImage], model_version: str, queue: str,
                 tenant: str = "default") -> tuple[int, list[Doorbell]]:
    """One listed page of a backfill -> (images new to the batch, doorbells of the jobs made now)."""
    now = utcnow()
    ids = list(dict.fromkeys(add_images(session, images, tenant, now).values()))
    created = add_jobs(session, ids, model_version, queue, now)
    return add_to_batch(session, batch_id, ids), created


def retry_failed(session: Session, tenant: str, image_id: int | None = None, batch_id: int | None = None,
                 error_code: str | None = None) -> list[Doorbell]:
    """Failed jobs of the tenant (of one image, of one batch's model, with one error code, as given)
    back to queued with a fresh attempt count; each keeps its error in error_history -> the
    doorbells to ring once committed. Another tenant's jobs are never among them."""
    where = [Job.status == "failed", Image.tenant == tenant]
    if image_id is not None:
        where.append(Job.image_id == image_id)
    if batch_id is not None:
        where += [Job.image_id.in_(select(BatchImage.image_id).where(BatchImage.batch_id == batch_id)),
                  Job.model_version == select(Batch.model_version).where(Batch.id == batch_id).scalar_subquery()]
    if error_code is not None:
        where.append(Job.error_code == error_code)
    now = utcnow()
    failed = session.scalars(select(Job).join(Image, Job.image_id == Image.id).where(*where)
                             .order_by(Job.id).with_for_update(of=Job)).all()
    for job in failed:
        job.error_history = [*(job.error_history or []), {"code": job.error_code, "message": job.error_message,
                                                         "attempts": job.attempts,
                                                         "at": (job.finished_at or now).isoformat()}]
        job.status, job.attempts, job.error_code, job.error_message = "queued", 0, None, None
        job.lease_until, job.finished_at, job.updated_at = None, None, now
    session.flush()
    return [Doorbell(job.id, job.queue, job.image_id) for job in failed]


def job_status(session: Session, job_id: int) -> str | None:
    return session.scalar(select(Job.status).where(Job.id == job_id))
