"""Whole-library work: an S3 prefix of any size enqueued page by page in bounded memory, and
re-captioning a library when a new model ships. Both go to the backfill queue, so single uploads
(the interactive queue) are never stuck behind them."""
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, TypeVar

from sqlalchemy import exists, select
from sqlalchemy.orm import sessionmaker

from . import queries
from .errors import InvalidRequest
from .jobs import s3_image
from .prefixes import Skipped, image_pages
from .queue import Publish
from .tables import Caption, Image, Job, utcnow

PAGE = 1000  # images per transaction when re-captioning (S3 lists 1,000 keys a page)
T = TypeVar("T")


@dataclass(frozen=True)
class Enqueued:
    batch_id: int | None  # None: nothing to do
    total: int  # images in the batch
    new_jobs: int  # jobs created (and published) now; the rest existed already
    truncated: bool  # the prefix held more images than the limit; the first `limit` were taken
    seconds: float
    skipped: Skipped = field(default_factory=Skipped)  # objects under the prefix that are not images, and why


def _prefetched(pages: Iterator[T]) -> Iterator[T]:
    """The next page is listed and sorted while this one is written: listing (botocore parsing XML,
    CPU), reading the objects' first bytes (waiting on S3) and inserting (waiting on PostgreSQL)
    overlap instead of taking turns."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = pool.submit(next, pages, None)
        while (page := ahead.result()) is not None:
            ahead = pool.submit(next, pages, None)
            yield page


def enqueue_prefix(sm: sessionmaker, bucket: str, prefix: str, model_version: str, queue: str, publish: Publish,
                   limit: int, max_bytes: int, tenant: str = "default", callback_url: str | None = None,
                   write_metadata: str | None = None, trust_suffixes: bool = False) -> Enqueued:
    """Every image under s3://bucket/prefix (chosen by content: core/prefixes.py) as a batch: one
    transaction and one doorbell per listed page, so memory stays bounded and workers start on the
    first page while the rest is listed and sorted. The same prefix again makes no new jobs (same
    tenant + ETag + model = the same job)."""
    started = time.perf_counter()
    batch_id, total, new, listed, truncated = None, 0, 0, 0, False
    skipped = Skipped()
    for page in _prefetched(image_pages(bucket, prefix, max_bytes, skipped, trust_suffixes)):
        if not page:
            continue
        if listed + len(page) > limit:
            page, truncated = page[:limit - listed], True
        listed += len(page)
        with sm.begin() as s:
            if batch_id is None:
                batch_id = queries.create_batch(s, f"s3://{bucket}/{prefix}", model_version, [], tenant, callback_url,
                                                write_metadata).id
            added, created = queries.enqueue_page(s, batch_id, [s3_image(o) for o in page], model_version, queue,
                                                  tenant)
        publish(created)  # after the commit: a worker must find the rows
        total, new = total + added, new + len(created)
        if truncated:
            break
    if batch_id is None:
        left_out = f": {skipped.summary()}, e.g. " + ", ".join(
            f"{k['key']} ({k['reason']})" for k in skipped.keys[:5]) if skipped.count else ""
        raise InvalidRequest(f"no images under s3://{bucket}/{prefix}{left_out}", code="empty_batch")
    return Enqueued(batch_id, total, new, truncated, time.perf_counter() - started, skipped)


def recaption(sm: sessionmaker, model_version: str, publish: Publish, from_version: str | None = None,
              every_image: bool = False, tenant: str = "default") -> Enqueued:
    """Backfill jobs for `model_version` for images captioned by another version (only
    `from_version`, if given; every image without a job for this version, with every_image). The
    new caption is stored beside the old one; people's alt-text decisions are separate rows and stay."""
    started = time.perf_counter()
    has_job = exists().where(Job.image_id == Image.id, Job.model_version == model_version)
    older = exists().where(Caption.image_id == Image.id, Caption.model_version != model_version)
    if from_version:
        older = exists().where(Caption.image_id == Image.id, Caption.model_version == from_version)
    todo = select(Image.id).where(Image.tenant == tenant, ~has_job)
    if not every_image:
        todo = todo.where(older)
    source = "recaption: every image" if every_image else f"recaption from {from_version or 'older models'}"
    batch_id, total, new, after = None, 0, 0, 0
    while True:  # keyset pages by image id: bounded memory, and each page commits on its own
        with sm.begin() as s:
            ids = list(s.scalars(todo.where(Image.id > after).order_by(Image.id).limit(PAGE)))
            if not ids:
                break
            if batch_id is None:
                batch_id = queries.create_batch(s, source, model_version, [], tenant).id
            created = queries.add_jobs(s, ids, model_version, "backfill", utcnow())
            added = queries.add_to_batch(s, batch_id, ids)
        publish(created)
        total, new, after = total + added, new + len(created), ids[-1]
    return Enqueued(batch_id, total, new, False, time.perf_counter() - started)
