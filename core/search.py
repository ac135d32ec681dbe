"""Caption search. A simple word match for now, behind the interface a real index will keep
(microblog's search.py is the model): callers never see how matching is done."""
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from .tables import Caption, Image


def query_index(session: Session, query: str, limit: int, tenant: str = "default") -> list[dict[str, Any]]:
    """The tenant's images whose caption or alt text contains every word of `query`, most confident first."""
    if "\x00" in query:
        return []  # no caption holds a NUL, and PostgreSQL refuses one in a text parameter
    words = [w for w in query.lower().split() if w]
    stmt = select(Image.id, Image.uri, Caption.text, Caption.confidence, Caption.model_version) \
        .join(Caption, Caption.image_id == Image.id).where(Image.tenant == tenant)
    for word in words:
        literal = word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")  # LIKE wildcards match themselves
        pattern = f"%{literal}%"
        stmt = stmt.where(or_(Caption.text.ilike(pattern, escape="\\"), Caption.alt_text.ilike(pattern, escape="\\")))
    rows = session.execute(stmt.order_by(Caption.confidence.desc(), Image.id).limit(limit)).all()
    return [{"id": r.id, "source": r.uri, "caption": r.text, "confidence": r.confidence,
             "model_version": r.model_version} for r in rows]
