"Liveness and readiness probes for the orchestrator."
from flask import Blueprint, Response, jsonify
from sqlalchemy import text

from captioner.core import captioner, storage
from captioner.core.errors import CaptioningError

from . import get_session, services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """200 only when the database, the broker, storage and the model checkpoint are usable."""
    svc = services()
    checks: dict[str, str] = {}
    try:
        get_session().execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as e:  # any driver error means not ready; the message says which
        checks["database"] = f"error: {e.__class__.__name__}"
    if svc.celery is None:
        checks["broker"] = "not configured (embedded mode: run `captioner caption` to process jobs)"
    else:
        try:
            with svc.celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
            checks["broker"] = "ok"
        except Exception as e:  # kombu raises transport-specific types
            checks["broker"] = f"error: {e.__class__.__name__}"
    try:
        storage.check(svc.settings.storage)
        checks["storage"] = "ok"
    except CaptioningError as e:
        checks["storage"] = f"error: {e.message}"
    try:
        checks["model"] = svc.current_model_version()
    except CaptioningError as e:
        checks["model"] = f"error: {e.message}"
    checks["runtime"] = captioner.runtime_plan(svc.settings)  # what a worker on a host like this one runs
    ready = all(not v.startswith("error") for v in checks.values())
    return jsonify({"status": "ready" if ready else "not ready", "checks": checks}), 200 if ready else 503
