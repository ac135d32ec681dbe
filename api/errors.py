"""The one place that maps errors to HTTP: every 4xx/5xx is {"error": {"code", "message"}}, or
for the web interface's pages an HTML page saying the same."""
import logging

from flask import Flask, Response, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from captioner.core.errors import (
    AccessDenied,
    CaptioningError,
    ConfigError,
    Conflict,
    InvalidImage,
    InvalidRequest,
    NotFound,
    TooLarge,
    TransientError,
    Unauthenticated,
)

log = logging.getLogger(__name__)

STATUS = {InvalidRequest: 400, Unauthenticated: 401, AccessDenied: 403, NotFound: 404, Conflict: 409, TooLarge: 413,
          InvalidImage: 422, TransientError: 503, ConfigError: 503}


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


Headers = list[tuple[str, str]]
Answer = tuple[Response | str, int, Headers]  # a JSON body, or a rendered HTML page


def _response(status: int, code: str, message: str, headers: Headers | None = None) -> Answer:
    if request.blueprint == "web":  # a person reads this one
        return render_template("error.html", status=status, code=code, message=message), status, headers or []
    return jsonify(error_body(code, message)), status, headers or []


def _captioning_error(e: CaptioningError) -> Answer:
    status = next((s for cls, s in STATUS.items() if isinstance(e, cls)), 500)
    # RFC 6750: a 401 names the scheme it wants, and says when the token sent was not accepted
    headers = [("WWW-Authenticate", 'Bearer realm="captioner"' if e.code == "missing_api_key" else
                'Bearer realm="captioner", error="invalid_token"')] if status == 401 else None
    return _response(status, e.code, e.message, headers)


def _http_error(e: HTTPException) -> Answer:
    # 404s, 405s and 413s from Flask itself look like ours; their headers stay (a 405 must carry Allow)
    headers = [(k, v) for k, v in e.get_headers() if k.lower() != "content-type"]
    return _response(e.code or 500, (e.name or "error").lower().replace(" ", "_"), e.description or "", headers)


def _unexpected(e: Exception) -> Answer:
    log.exception("unhandled error")  # the traceback goes to the log, never to the client
    return _response(500, "internal_error", "internal server error")


def init_app(app: Flask) -> None:
    app.register_error_handler(CaptioningError, _captioning_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
