"""The one place that maps errors to HTTP: every 4xx/5xx is {"error": {"code", "message"}}."""
import logging

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from core.errors import CaptioningError, ConfigError, InvalidImage, InvalidRequest, NotFound, TooLarge, TransientError

log = logging.getLogger(__name__)

STATUS = {InvalidRequest: 400, NotFound: 404, TooLarge: 413, InvalidImage: 422,
          TransientError: 503, ConfigError: 503}


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def _response(status: int, code: str, message: str) -> tuple[Response, int]:
    return jsonify(error_body(code, message)), status


def _captioning_error(e: CaptioningError) -> tuple[Response, int]:
    status = next((s for cls, s in STATUS.items() if isinstance(e, cls)), 500)
    return _response(status, e.code, e.message)


def _http_error(e: HTTPException) -> tuple[Response, int]:
    # 404s, 405s and 413s from Flask itself look like ours
    return _response(e.code or 500, (e.name or "error").lower().replace(" ", "_"), e.description or "")


def _unexpected(e: Exception) -> tuple[Response, int]:
    log.exception("unhandled error")  # the traceback goes to the log, never to the client
    return _response(500, "internal_error", "internal server error")


def init_app(app: Flask) -> None:
    app.register_error_handler(CaptioningError, _captioning_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
