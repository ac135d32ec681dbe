"""What the web interface lists: a page of a tenant's images (all of them, or one batch's), the
alt-text review queue, and a tenant's batches. Each function takes a Session; the caller owns the
transaction. One image's page is queries.image_view and a batch's progress queries.batch_view, as
in the API.

Pages are keyset pages (ids before or after one already shown), not offsets: page 400 of a large
library costs what page 1 costs, and an upload arriving meanwhile shifts nothing. The review queue
is keyset-paged the same way, on its own order (_review_order)."""
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, exists, func, select, tuple_
from sqlalchemy.orm import Session, aliased

from . import alttext, queries
from .errors import NotFound
from .tables import AltTextDecision, Batch, BatchImage, Caption, Image, Job


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    newer: int | None  # ?after= this id shows the page before this one (newer images); None on the first page
    older: int | None  # ?before= this id shows the next page (older images); None on the last page


def _newest_id(cls: Any) -> Any:
    """The newest row of `cls` (a job, caption or decision) for the image in the outer query."""
    own = aliased(cls)  # the subquery's own, correlated to Image only
    return select(func.max(own.id)).where(own.image_id == Image.id).correlate(Image).scalar_subquery()


def _listed(tenant: str) -> Select:
    """(Image, its newest job's status and error, newest caption, newest decision) per image."""
    return (select(Image, queries.VISIBLE_STATUS, Job.error_code, Caption, AltTextDecision).select_from(Image)
            .outerjoin(Job, Job.id == _newest_id(Job))
            .outerjoin(Caption, Caption.id == _newest_id(Caption))
            .outerjoin(AltTextDecision, AltTextDecision.id == _newest_id(AltTextDecision))
            .where(Image.tenant == tenant))


def _card(image: Image, status: str | None, error_code: str | None, caption: Caption | None,
          decision: AltTextDecision | None) -> dict[str, Any]:
    alt = alttext.current(caption, decision) if caption or decision else None
    return {"id": image.id, "status": status or "queued", "error_code": error_code,
            "caption": caption.text if caption else None,
            "alt_text": alt["text"] if alt else None, "alt_text_state": alt["state"] if alt else None,
            "tags": [label for label, _ in caption.tags] if caption else [],
            "quality": caption.quality if caption else None,
            "created_at": image.created_at}


def images(session: Session, tenant: str, limit: int, before: int | None = None, after: int | None = None,
           batch_id: int | None = None, status: str | None = None) -> Page:
    """A page of the tenant's images (of one batch, with one status, if given), newest first: those
    with ids below `before`, or the `limit` just above `after`, or the newest."""
    stmt = _listed(tenant)
    if batch_id is not None:
        stmt = stmt.where(Image.id.in_(select(BatchImage.image_id).where(BatchImage.batch_id == batch_id)))
    if status is not None:
        stmt = stmt.where(Job.status == status)
    if after is not None:
        rows = session.execute(stmt.where(Image.id > after).order_by(Image.id).limit(limit + 1)).all()
        if len(rows) > limit:  # still newer ones above: this is a page in the middle
            items = [_card(*r) for r in reversed(rows[:limit])]
            return Page(items, newer=items[0]["id"], older=items[-1]["id"])
        after = None  # the newest images: show the first page, full
    if before is not None:
        stmt = stmt.where(Image.id < before)
    rows = session.execute(stmt.order_by(Image.id.desc()).limit(limit + 1)).all()
    items = [_card(*r) for r in rows[:limit]]
    newer = items[0]["id"] if before is not None and items else None
    return Page(items, newer=newer, older=items[-1]["id"] if len(rows) > limit else None)


def _needing_review(tenant: str) -> Select:
    """Images whose alt text is the model's and flagged: the newest caption needs review and no
    person has decided yet (a decision, whatever it was, takes an image out of the queue).
    Read from the flagged captions, so that the queue's order walks ix_captions_review."""
    newer = aliased(Caption)
    return (select(Caption.image_id).join(Image, Image.id == Caption.image_id)
            .where(Caption.needs_review, Image.tenant == tenant,
                   ~exists().where(newer.image_id == Caption.image_id, newer.id > Caption.id),
                   ~exists().where(AltTextDecision.image_id == Caption.image_id)))


def _review_order() -> tuple[Any, Any, Any]:
    """The review queue's order, most doubtful first, by the newest caption: those with a quality
    estimate by quality ascending, then those without (a model with no fitted estimator) by
    confidence ascending; the two are different scales, so neither is slotted into the other.
    The image id breaks ties, which makes it a total order to page on. ix_captions_review holds
    these keys."""
    return Caption.quality.is_(None), func.coalesce(Caption.quality, Caption.confidence), Caption.image_id


def review_queue(session: Session, tenant: str, limit: int, after: int | None = None) -> list[int]:
    """Ids of images waiting for review, most doubtful first (_review_order): those after image
    `after` in that order, to skip ones looked at; from the first when `after` is not the
    tenant's captioned image."""
    order = _review_order()
    stmt = _needing_review(tenant)
    if after is not None:
        # `after` itself may have left the queue (decided in another tab): its key still places it
        key = session.execute(select(*order).join(Image, Image.id == Caption.image_id)
                              .where(Caption.id == _newest_id(Caption), Image.id == after, Image.tenant == tenant)
                              ).first()
        if key is not None:
            stmt = stmt.where(tuple_(*order) > tuple_(*key))
    return list(session.scalars(stmt.order_by(*order).limit(limit)))


def review_count(session: Session, tenant: str, cap: int) -> int:
    """How many wait for review, counted up to `cap`: every page shows it, and a count of a
    library-wide backlog would scan it all each time."""
    return session.scalar(select(func.count()).select_from(_needing_review(tenant).limit(cap).subquery())) or 0


def batches(session: Session, tenant: str, limit: int) -> list[int]:
    """Ids of the tenant's newest batches, newest first."""
    return list(session.scalars(select(Batch.id).where(Batch.tenant == tenant).order_by(Batch.id.desc()).limit(limit)))


def image(session: Session, image_id: int, tenant: str) -> Image:
    """The tenant's image; NotFound for another tenant's, exactly as for one that does not exist."""
    row = session.get(Image, image_id)
    if row is None or row.tenant != tenant:
        raise NotFound(f"no image with id {image_id}")
    return row


def captioned(session: Session, image_id: int) -> bool:
    """Whether a worker has captioned the image (for some model): it read and decoded it within the limits."""
    return session.scalar(select(Job.id).where(Job.image_id == image_id, Job.status == "done").limit(1)) is not None


def cards(session: Session, tenant: str, image_ids: list[int]) -> list[dict[str, Any]]:
    """The listing of these images (the tenant's only), in the order given: search results as cards."""
    found = {r[0].id: _card(*r) for r in session.execute(_listed(tenant).where(Image.id.in_(image_ids))).all()}
    return [found[i] for i in image_ids if i in found]
