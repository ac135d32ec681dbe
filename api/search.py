"/v1/search: captioned images ranked by how well their caption, alt text and tags match q."
from flask import Blueprint, Response, g, jsonify, request

from captioner.core import search, storage
from captioner.core.errors import InvalidRequest

from . import bodies, get_session
from .auth import require_scope

MAX_LIMIT = 100
# What the OpenAPI document states q must be: under MAX_QUERY_CHARS, no NUL, and at least one
# letter or digit (Python's `[^\W_]`, the same test core/search.py splits words with).
QUERY = "^[^\\x00]*[^\\W_][^\\x00]*$"

bp = Blueprint("search", __name__, url_prefix="/v1/search")


@bp.get("")
@require_scope("read")
def search_captions() -> Response:
    q = request.args.get("q", "")
    if not q.strip():
        raise InvalidRequest("give the words to search for as ?q=")
    limit = bodies.int_arg("limit", 20, 1, MAX_LIMIT)
    offset = bodies.int_arg("offset", 0, 0, search.MAX_OFFSET)
    # one row more than asked says whether there is a next page
    rows = search.query_index(get_session(), q, limit + 1, offset, tenant=g.tenant)
    next_offset = offset + limit if len(rows) > limit and offset + limit <= search.MAX_OFFSET else None
    results = [{**r, "source": storage.public_source(r["source"])} for r in rows[:limit]]
    return jsonify({"query": q, "results": results, "next_offset": next_offset})
