"""Alt text as a CMS sees it: the model's suggestions and people's decisions, with their history.

A person's decision (approved, edited, decorative) is a row of its own, never overwritten: a
re-caption by a newer model adds a caption row (a new suggestion) and leaves the decision in
force. Without a decision the newest caption's alt text is served, `needs_review` when the model
was unsure (WebAIM: alt text is checked by a person when it may be wrong)."""
import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .errors import Conflict, InvalidRequest, NotFound
from .tables import DECISIONS, AltTextDecision, Caption, Image, utcnow

MAX_CHARS = 1000  # a person's text; the model's own stays under 250 (model/alt_text.py)
SOFT_LIMIT = 125  # longer alt text is read in one breath and cannot be paused (field notes)
_PREAMBLE = re.compile(r"^\s*(?:an?\s+|the\s+)?(?:image|picture|photo|photograph|graphic)\s+(?:of|showing)\b",
                       re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FILE_NAME = re.compile(r"\b[\w-]+\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic)\b", re.IGNORECASE)


def lint(text: str) -> list[str]:
    """WAI/WebAIM advice a person's alt text does not follow; warnings, not errors: the person decides."""
    warnings = []
    if _PREAMBLE.search(text):
        warnings.append('starts with "image of" or the like: screen readers already announce an image')
    if _FILE_NAME.search(text):
        warnings.append("contains a file name, which describes nothing")
    if len(text) > SOFT_LIMIT:
        warnings.append(f"longer than {SOFT_LIMIT} characters: consider a caption or long description")
    return warnings


def _image(session: Session, image_id: int, tenant: str) -> Image:
    image = session.get(Image, image_id)
    if image is None or image.tenant != tenant:
        raise NotFound(f"no image with id {image_id}")
    return image


def _captions(session: Session, image_id: int) -> list[Caption]:
    """Oldest first; the last one is the current suggestion (the newest model's)."""
    return list(session.scalars(select(Caption).where(Caption.image_id == image_id)
                                .order_by(Caption.created_at, Caption.id)))


def _decisions(session: Session, image_id: int) -> list[AltTextDecision]:
    return list(session.scalars(select(AltTextDecision).where(AltTextDecision.image_id == image_id)
                                .order_by(AltTextDecision.decided_at, AltTextDecision.id)))


def _suggestion(caption: Caption) -> dict[str, Any]:
    return {"text": caption.alt_text, "state": "needs_review" if caption.needs_review else "generated",
            "model_version": caption.model_version, "by": None, "at": caption.created_at.isoformat()}


def _decision(d: AltTextDecision) -> dict[str, Any]:
    return {"text": d.text, "state": d.state, "model_version": d.model_version, "by": d.decided_by,
            "at": d.decided_at.isoformat()}


def view(session: Session, image_id: int, tenant: str = "default") -> dict[str, Any]:
    """{text, state, ..., suggestion, history}: the alt text to serve, the model's newest
    suggestion, and every suggestion and decision in time order."""
    _image(session, image_id, tenant)
    return _view(_captions(session, image_id), _decisions(session, image_id))


def current(caption: Caption, decision: AltTextDecision | None) -> dict[str, Any]:
    """The alt text to serve: a person's newest decision, else the newest caption's suggestion."""
    return _decision(decision) if decision else _suggestion(caption)


def _view(captions: list[Caption], decisions: list[AltTextDecision]) -> dict[str, Any]:
    suggestion = _suggestion(captions[-1]) if captions else None
    current = _decision(decisions[-1]) if decisions else suggestion
    history = sorted([*map(_suggestion, captions), *map(_decision, decisions)], key=lambda h: h["at"])
    empty = {"text": None, "state": None, "model_version": None, "by": None, "at": None}
    return {**(current or empty), "suggestion": suggestion, "history": history}


def decide(session: Session, image_id: int, state: str, text: str | None, who: str,
           tenant: str = "default") -> dict[str, Any]:
    """Record a person's decision -> the new view. `approved` without text approves the current
    suggestion; `edited` replaces it; `decorative` is alt=\"\" (WAI: purely decorative images)."""
    if state not in DECISIONS:
        raise InvalidRequest(f"state must be one of {', '.join(DECISIONS)}")
    _image(session, image_id, tenant)
    captions = _captions(session, image_id)
    suggestion = captions[-1] if captions else None
    version = suggestion.model_version if suggestion else None
    if state == "decorative":
        if text:
            raise InvalidRequest('a decorative image has empty alt text: send no text (or "")')
        text = ""
    elif state == "approved":
        if suggestion is None:
            raise Conflict(f"image {image_id} has no caption yet: nothing to approve", code="not_captioned")
        if text is not None and text != suggestion.alt_text:
            raise InvalidRequest("approved takes no text (it approves the current suggestion); "
                                 'send state "edited" to change the text')
        text = suggestion.alt_text
    else:
        if text is not None and len(text) > MAX_CHARS:
            raise InvalidRequest(f"text must be at most {MAX_CHARS} characters")
        if text is not None and _CONTROL.search(text):
            raise InvalidRequest("text must not contain control characters (alt text is one line)")
        text = (text or "").strip()
        if not text:
            raise InvalidRequest("edited needs a non-empty text")
    session.add(AltTextDecision(image_id=image_id, state=state, text=text, model_version=version,
                                decided_by=who[:200], decided_at=utcnow()))
    session.flush()
    return {**_view(captions, _decisions(session, image_id)), "warnings": lint(text)}
