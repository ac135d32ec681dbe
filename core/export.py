"""Export for CMS imports: one record per image (key, state, alt text, caption, ...) as JSON
lines or CSV, streamed: rows are read in chunks (yield_per) and written as they come, so a
library of 100k images never sits in memory."""
import csv
import heapq
import io
import json
from typing import Any, Iterable, Iterator

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session, aliased

from . import alttext, queries
from .tables import Caption, Image, Job

FIELDS = ["key", "state", "alt_text", "caption", "confidence", "quality", "needs_review", "candidates", "tags",
          "model_version", "id", "sha256", "width", "height", "captioned_at"]
FAILED_FIELDS = [*FIELDS, "error_code", "error_message"]  # with failed images (include_failed)
FORMATS = ("jsonl", "csv")
CHUNK = 1000  # rows per fetch


def key(image: Image) -> str:
    """An image's key in an export: an upload's file name, else the URI it is read from."""
    return image.name or image.uri


def records(session: Session, tenant: str, model_version: str | None = None,
            include_failed: bool = False) -> Iterator[dict[str, Any]]:
    """One record per captioned image of `tenant`, oldest image first: its newest caption (or the
    one by `model_version`) and the alt text to serve, a person's decision before the model's.
    With `include_failed`, images whose job failed and that have no such caption come in their
    place, with state `failed` and the error's code and message (every record then has both)."""
    # a generator throughout: nothing is read before the first row is asked for (the API streams
    # the rows inside the request's context)
    query = queries.results_query(model_version).where(Image.tenant == tenant)
    captioned = (_captioned(image, cap, decision, include_failed)
                 for image, cap, decision in session.execute(query.execution_options(yield_per=CHUNK)))
    if not include_failed:
        yield from captioned
        return
    failed = (_failed(image, job) for image, job in session.execute(
        _failed_query(tenant, model_version).execution_options(yield_per=CHUNK)))
    yield from heapq.merge(captioned, failed, key=lambda row: row["id"])  # both oldest image first


def _captioned(image: Image, cap: Caption, decision: Any, with_error: bool) -> dict[str, Any]:
    alt = alttext.current(cap, decision)
    row = {"key": key(image), "state": alt["state"], "alt_text": alt["text"], "caption": cap.text,
           "confidence": cap.confidence, "quality": cap.quality, "needs_review": cap.needs_review,
           "candidates": [{"text": t, "score": p} for t, p in cap.candidates],
           "tags": [{"label": t, "score": p} for t, p in cap.tags],
           "model_version": cap.model_version, "id": image.id, "sha256": image.sha256,
           "width": image.width, "height": image.height, "captioned_at": cap.created_at.isoformat()}
    return {**row, "error_code": None, "error_message": None} if with_error else row


def _failed(image: Image, job: Job) -> dict[str, Any]:
    return {"key": key(image), "state": "failed", "alt_text": None, "caption": None, "confidence": None,
            "quality": None, "needs_review": None, "candidates": [], "tags": [], "model_version": job.model_version, "id": image.id,
            "sha256": image.sha256, "width": image.width, "height": image.height, "captioned_at": None,
            "error_code": job.error_code, "error_message": job.error_message}


def _failed_query(tenant: str, model_version: str | None) -> Any:
    """(Image, Job) per image of `tenant` whose newest job (or the one for `model_version`) failed
    and that has no caption the captioned query would export, oldest image first."""
    own, cap = aliased(Job), aliased(Caption)
    newest_job = select(func.max(own.id)).where(own.image_id == Image.id).correlate(Image)
    caption = exists().where(cap.image_id == Image.id)
    if model_version:
        newest_job = newest_job.where(own.model_version == model_version)
        caption = caption.where(cap.model_version == model_version)
    return (select(Image, Job).join(Job, Job.id == newest_job.scalar_subquery())
            .where(Image.tenant == tenant, Job.status == "failed", ~caption).order_by(Image.id))


def jsonl(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    for row in rows:
        yield json.dumps(row, ensure_ascii=False) + "\n"


def csv_lines(rows: Iterable[dict[str, Any]], fields: list[str] = FIELDS) -> Iterator[str]:
    """CSV text (header first), one chunk per row; the csv module does the quoting."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fields)

    def taken() -> str:
        text = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return text

    writer.writeheader()
    yield taken()
    for row in rows:
        # a spreadsheet cell holds one value: lists become JSON text
        writer.writerow({**row, "candidates": json.dumps(row["candidates"], ensure_ascii=False),
                         "tags": json.dumps(row["tags"], ensure_ascii=False)})
        yield taken()


def lines(fmt: str, rows: Iterable[dict[str, Any]], include_failed: bool = False) -> Iterator[str]:
    return csv_lines(rows, FAILED_FIELDS if include_failed else FIELDS) if fmt == "csv" else jsonl(rows)
