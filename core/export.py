"""Export for CMS imports: one record per image (key, state, alt text, caption, ...) as JSON
lines or CSV, streamed: rows are read in chunks (yield_per) and written as they come, so a
library of 100k images never sits in memory."""
import csv
import io
import json
from typing import Any, Iterable, Iterator

from sqlalchemy.orm import Session

from . import alttext, queries
from .tables import Image

FIELDS = ["key", "state", "alt_text", "caption", "confidence", "quality", "needs_review", "candidates", "tags",
          "model_version", "id", "sha256", "width", "height", "captioned_at"]
FORMATS = ("jsonl", "csv")
CHUNK = 1000  # rows per fetch


def records(session: Session, tenant: str, model_version: str | None = None) -> Iterator[dict[str, Any]]:
    """One record per captioned image of `tenant`, oldest image first: its newest caption (or the
    one by `model_version`) and the alt text to serve, a person's decision before the model's."""
    query = queries.results_query(model_version).where(Image.tenant == tenant)
    for image, cap, decision in session.execute(query.execution_options(yield_per=CHUNK)):
        alt = alttext.current(cap, decision)
        yield {"key": image.uri, "state": alt["state"], "alt_text": alt["text"], "caption": cap.text,
               "confidence": cap.confidence, "quality": cap.quality, "needs_review": cap.needs_review,
               "candidates": [{"text": t, "score": p} for t, p in cap.candidates],
               "tags": [{"label": t, "score": p} for t, p in cap.tags],
               "model_version": cap.model_version, "id": image.id, "sha256": image.sha256,
               "width": image.width, "height": image.height, "captioned_at": cap.created_at.isoformat()}


def jsonl(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    for row in rows:
        yield json.dumps(row, ensure_ascii=False) + "\n"


def csv_lines(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    """CSV text (header first), one chunk per row; the csv module does the quoting."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, FIELDS)

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


def lines(fmt: str, rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    return csv_lines(rows) if fmt == "csv" else jsonl(rows)
