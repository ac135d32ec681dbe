"/v1/search: captions matching words (a simple match until the search issue lands)."
import re

from flask import Blueprint, Response, g, jsonify, request

from core import search
from core.errors import InvalidRequest

from . import get_session
from .auth import require_scope

MAX_LIMIT = 100
# a character that is not white space, spelt out: Python's str.split() and the JSON Schema (ECMA)
# `\S` disagree (\x1c-\x1f, \x85, \ufeff), and the OpenAPI document states this same pattern
WORD = "[^\\t\\n\\v\\f\\r \\x1c-\\x1f\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff]"

bp = Blueprint("search", __name__, url_prefix="/v1/search")


@bp.get("")
@require_scope("read")
def search_captions() -> Response:
    q = request.args.get("q", "").strip()
    if not re.search(WORD, q):
        raise InvalidRequest("give the words to search for as ?q=")
    try:
        limit = int(request.args.get("limit", 20))
    except ValueError:
        raise InvalidRequest("limit must be an integer") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be between 1 and {MAX_LIMIT}")
    return jsonify({"query": q, "results": search.query_index(get_session(), q, limit, tenant=g.tenant)})
