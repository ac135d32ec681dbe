"""/v1/images/<id>/alt-text: the alt text a CMS serves, and a person's decision about it."""
from flask import Blueprint, Response, g, jsonify

from core import alttext
from core.errors import InvalidRequest

from . import bodies, get_session
from .auth import require_scope

bp = Blueprint("alttext", __name__, url_prefix="/v1/images")


def _tenant() -> str:
    return g.tenant


@bp.get("/<id:image_id>/alt-text")
@require_scope("read")
def get_alt_text(image_id: int) -> Response:
    return jsonify(alttext.view(get_session(), image_id, _tenant()))


@bp.get("/<id:image_id>/alt-text/history")
@require_scope("read")
def get_alt_text_history(image_id: int) -> Response:
    return jsonify({"history": alttext.view(get_session(), image_id, _tenant())["history"]})


@bp.patch("/<id:image_id>/alt-text")
@require_scope("write")
def decide_alt_text(image_id: int) -> Response:
    body = bodies.json_object(("text", "state"))
    if "state" not in body:
        raise InvalidRequest('send {"state": "approved" | "edited" | "decorative", "text": ...}')
    text = body.get("text")
    if text is not None and not isinstance(text, str):
        raise InvalidRequest("text must be a string")
    if not isinstance(body["state"], str):
        raise InvalidRequest("state must be a string")
    session = get_session()
    view = alttext.decide(session, image_id, body["state"], text, g.principal, _tenant())
    session.commit()
    return jsonify(view)
