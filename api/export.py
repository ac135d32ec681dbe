"""/v1/export: every caption of the tenant as JSON lines or CSV, streamed (nothing to paginate);
with include_failed=true the failed images too."""
from flask import Blueprint, Response, g, request, stream_with_context

from captioner.core import export
from captioner.core.errors import InvalidRequest

from . import bodies, get_session
from .auth import require_scope

MEDIA_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv"}

bp = Blueprint("export", __name__, url_prefix="/v1/export")


@bp.get("")
@require_scope("read")
def export_captions() -> Response:
    fmt = request.args.get("format", "jsonl")
    if fmt not in export.FORMATS:
        raise InvalidRequest(f"format must be one of: {', '.join(export.FORMATS)}")
    include_failed = bodies.flag_arg("include_failed")
    rows = export.records(get_session(), g.tenant, request.args.get("model_version") or None, include_failed)
    # stream_with_context: the request (and its session, closed at teardown) lives until the last row
    return Response(stream_with_context(export.lines(fmt, rows, include_failed)), mimetype=MEDIA_TYPES[fmt],
                    headers={"Content-Disposition": f"attachment; filename=captions.{fmt}"})
