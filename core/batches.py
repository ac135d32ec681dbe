"""What an operator asks of batches: the tenant's batches, newest first; a batch's images by status,
with each failure's code and message; cancelling what is still queued. Each function takes a
Session; the caller owns the transaction. A batch's progress is queries.batch_view.

Cancelling fits the job life-cycle without a new state: a queued job becomes `failed` with the
code `cancelled`, so a worker that still receives its id drops it at the claim (only queued jobs
are claimed), the sweep never publishes it again (it only touches queued and processing jobs),
and retrying the batch (all failures, or `error: cancelled` alone) resumes it. Jobs being
captioned finish; done ones stay."""
from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session

from . import queries, storage
from .errors import InvalidRequest, NotFound
from .tables import STATUSES, Batch, BatchImage, Caption, Image, Job, utcnow

CANCELLED = "cancelled"  # the error code of a job whose batch was cancelled before a worker took it


def owned(session: Session, batch_id: int, tenant: str) -> Batch:
    """The tenant's batch; NotFound for another tenant's, exactly as for one that does not exist."""
    batch = session.get(Batch, batch_id)
    if batch is None or batch.tenant != tenant:
        raise NotFound(f"no batch with id {batch_id}")
    return batch


def _members(batch: Batch) -> Any:
    """The batch's jobs: its images' jobs for the batch's model version."""
    return and_(Job.model_version == batch.model_version,
                Job.image_id.in_(select(BatchImage.image_id).where(BatchImage.batch_id == batch.id)))


def listing(session: Session, tenant: str, limit: int, offset: int = 0) -> list[dict[str, Any]]:
    """The tenant's batches, newest first, each with its counts per status (one grouped query for
    the page, not one per batch)."""
    batches = session.scalars(select(Batch).where(Batch.tenant == tenant).order_by(Batch.id.desc())
                              .limit(limit).offset(offset)).all()
    counts: dict[int, dict[str, int]] = {b.id: dict.fromkeys(STATUSES, 0) for b in batches}
    if batches:
        rows = session.execute(
            select(BatchImage.batch_id, queries.VISIBLE_STATUS, func.count())
            .join(Batch, Batch.id == BatchImage.batch_id)
            .join(Job, and_(Job.image_id == BatchImage.image_id, Job.model_version == Batch.model_version))
            .where(BatchImage.batch_id.in_(list(counts)))
            .group_by(BatchImage.batch_id, queries.VISIBLE_STATUS))
        for batch_id, status, n in rows:
            counts[batch_id][status] = n
    return [{"id": b.id, "source": b.source, "total": b.total, "model_version": b.model_version,
             "counts": counts[b.id], "created_at": b.created_at.isoformat()} for b in batches]


def images(session: Session, batch_id: int, tenant: str, status: str | None, limit: int,
           offset: int = 0) -> list[dict[str, Any]]:
    """A page of the batch's images (with `status`, if given), oldest first: source, status, the
    error of a failed one, the caption of a done one."""
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}")
    batch = owned(session, batch_id, tenant)
    stmt = (select(Image, Job, Caption).join(Job, Job.image_id == Image.id)
            .outerjoin(Caption, and_(Caption.image_id == Image.id, Caption.model_version == Job.model_version))
            .where(_members(batch)))
    if status is not None:  # as the counts show it: a claimed job waiting for its forward is queued
        stmt = stmt.where(queries.VISIBLE_STATUS == status)
    rows = session.execute(stmt.order_by(Image.id).limit(limit).offset(offset)).all()
    return [{"id": image.id, "source": storage.public_source(image.uri, image.name),
             "status": queries.visible_status(job.status, job.started_at),
             "error": {"code": job.error_code, "message": job.error_message} if job.status == "failed" else None,
             "caption": caption.text if caption is not None and job.status == "done" else None}
            for image, job, caption in rows]


def cancel(session: Session, batch_id: int, tenant: str) -> int:
    """The batch's queued jobs -> failed with code `cancelled` -> how many. Idempotent: a second
    call finds none queued. A job shared with another submission (the same image in another batch)
    is cancelled for it too; retrying queues it again."""
    batch = owned(session, batch_id, tenant)
    now = utcnow()
    return session.execute(
        update(Job).where(Job.status == "queued", _members(batch))
        .values(status="failed", error_code=CANCELLED, error_message=f"batch {batch_id} was cancelled",
                lease_until=None, updated_at=now, finished_at=now)
        .execution_options(synchronize_session=False)).rowcount
