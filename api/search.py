"/v1/search: captions matching words (a simple match until the search issue lands)."
from flask import Blueprint, Response, jsonify, request

from core import search
from core.errors import InvalidRequest

from . import get_session

bp = Blueprint("search", __name__, url_prefix="/v1/search")


@bp.get("")
def search_captions() -> Response:
    q = request.args.get("q", "").strip()
    if not q:
        raise InvalidRequest("give the words to search for as ?q=")
    try:
        limit = min(int(request.args.get("limit", 20)), 100)
    except ValueError:
        raise InvalidRequest("limit must be an integer") from None
    return jsonify({"query": q, "results": search.query_index(get_session(), q, limit)})
