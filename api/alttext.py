"""/v1/images/<id>/alt-text: the alt text a CMS serves, and a person's decision about it."""
from flask import Blueprint, Response, g, jsonify, request

from captioner.core import alttext
from captioner.core.errors import InvalidRequest

from . import bodies, get_session
from .auth import require_scope

bp = Blueprint("alttext", __name__, url_prefix="/v1/images")


def _tenant() -> str:
    return g.tenant


@bp.get("/<id:image_id>/alt-text/history")
@require_scope("read")
def get_alt_text_history(image_id: int) -> Response:
    return jsonify({"history": alttext.view(get_session(), image_id, _tenant())["history"]})


# one rule for both methods: with two, werkzeug answers an out-of-range id's PATCH with a 405
@bp.route("/<id:image_id>/alt-text", methods=["GET", "PATCH"])
@require_scope({"GET": "read", "PATCH": "write"})
def alt_text(image_id: int) -> Response:
    if request.method != "PATCH":  # GET, or HEAD (GET without the body)
        return jsonify(alttext.view(get_session(), image_id, _tenant()))
    body = bodies.json_object(("text", "state"))
    if "state" not in body:
        raise InvalidRequest('send {"state": "approved" | "edited" | "decorative", "text": ...}')
    text = body.get("text")
    if "text" in body and not isinstance(text, str):  # null too: leave text out instead
        raise InvalidRequest("text must be a string")
    if not isinstance(body["state"], str):
        raise InvalidRequest("state must be a string")
    session = get_session()
    view = alttext.decide(session, image_id, body["state"], text, g.principal, _tenant())
    session.commit()
    return jsonify(view)
