"""The OpenAPI document (/openapi.json) and a plain docs page rendered from it (/docs).
The page is served by us, not from a CDN, so it works on an offline network."""
from typing import Any

from flask import Blueprint, Response, jsonify, render_template_string

from . import MAX_ID
from .bodies import BUCKET, KEY, PREFIX
from .search import WORD

bp = Blueprint("docs", __name__)

ERROR = {"$ref": "#/components/schemas/Error"}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": "error", "content": {"application/json": {"schema": ERROR}}} for s in statuses}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _object(required: list[str], **properties: Any) -> dict[str, Any]:
    """A closed object: the API answers 400 to a field it does not read, so the document says so."""
    return {"type": "object", "required": required, "properties": properties, "additionalProperties": False}


TEXT = {"type": "string", "minLength": 1}
INT = {"type": "integer"}
S3_BUCKET = {"type": "string", "pattern": BUCKET}
S3_OBJECT = _object(["bucket", "key"], bucket=S3_BUCKET, key={"type": "string", "pattern": KEY})
S3_PREFIX = _object(["bucket"], bucket=S3_BUCKET, prefix={"type": "string", "pattern": PREFIX})
QUEUE = {"type": "string", "enum": ["interactive", "backfill"]}
ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID}}]
# 403: an S3 bucket the service cannot read (missing or forbidden: one answer, so bucket names do not leak);
# 404: an S3 key that does not exist; 413: a body over CAPTIONER_MAX_UPLOAD_BYTES; 415: another media type
SUBMIT_ERRORS = _errors(400, 403, 404, 413, 415, 503)

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "captioner", "version": "1",
             "description": "Captions, alt text and tags for images. Submit, then poll until status is done."},
    "paths": {
        "/v1/images": {"post": {
            "summary": "Submit one image: an upload (multipart field `file`) or an S3 object",
            "requestBody": {"required": True, "content": {
                "multipart/form-data": {"schema": _object(["file"], file={"type": "string", "format": "binary"},
                                                          queue=QUEUE)},
                "application/json": {"schema": _object(["s3"], s3=S3_OBJECT, queue=QUEUE)}}},
            "responses": {"202": _json({"$ref": "#/components/schemas/Accepted"}, "queued"),
                          "200": _json({"$ref": "#/components/schemas/Accepted"}, "already captioned by this model"),
                          **SUBMIT_ERRORS, **_errors(422)}}},
        "/v1/images/{id}": {"get": {
            "summary": "An image's status and, once done, its caption, alt text, candidates and tags",
            "parameters": ID,
            "responses": {"200": _json({"$ref": "#/components/schemas/Image"}, "the image"), **_errors(404)}}},
        "/v1/batches": {"post": {
            "summary": "Submit every image under an S3 prefix, or a list of S3 objects",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
                _object(["s3"], queue=QUEUE, s3=S3_PREFIX),
                _object(["images"], queue=QUEUE, images={"type": "array", "minItems": 1, "maxItems": 10000,
                                                         "items": _object(["s3"], s3=S3_OBJECT)})]}}}},
            "responses": {"202": _json(_object(["id", "total", "url"], id=INT, total=INT, url=TEXT), "queued"),
                          **SUBMIT_ERRORS}}},
        "/v1/batches/{id}": {"get": {
            "summary": "Counts of a batch's images per status", "parameters": ID,
            "responses": {"200": _json({"$ref": "#/components/schemas/Batch"}, "the batch"), **_errors(404)}}},
        "/v1/search": {"get": {
            "summary": "Captioned images whose caption contains every word of q",
            "parameters": [{"name": "q", "in": "query", "required": True,
                            "schema": {"type": "string", "pattern": WORD}},
                           {"name": "limit", "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}}],
            "responses": {"200": _json({"$ref": "#/components/schemas/Results"}, "matches, most confident first"),
                          **_errors(400)}}},
        "/healthz": {"get": {"summary": "The process is alive",
                             "responses": {"200": _json(_object(["status"], status={"const": "ok"}), "ok")}}},
        "/readyz": {"get": {"summary": "Database, broker, storage and model are usable",
                            "responses": {"200": _json({"$ref": "#/components/schemas/Ready"}, "ready"),
                                          "503": _json({"$ref": "#/components/schemas/Ready"},
                                                       "not ready, with the failing checks")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics; needs Authorization: Bearer CAPTIONER_METRICS_TOKEN "
                                        "and is not served (404) when no token is configured",
                             "responses": {"200": {"description": "Prometheus text format",
                                                   "content": {"text/plain": {}}}, **_errors(401, 404)}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _json({"type": "object"}, "")}}},
        "/docs": {"get": {"summary": "This document as a page",
                          "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}}}},
    },
    "components": {"schemas": {
        "Error": _object(["error"], error=_object(["code", "message"], code=TEXT, message=TEXT)),
        "Accepted": _object(["id", "status", "queue", "model_version", "url"],
                            id=INT, status={"type": "string", "enum": ["queued", "processing", "done", "failed"]},
                            queue=QUEUE, model_version=TEXT, url=TEXT),
        "Image": _object(
            ["id", "status", "caption", "alt_text", "candidates", "tags", "confidence", "needs_review",
             "model_version", "error", "source", "sha256", "size", "width", "height", "created_at", "finished_at"],
            id=INT, status={"type": "string", "enum": ["queued", "processing", "done", "failed"]},
            caption={"type": ["string", "null"]}, alt_text={"type": ["string", "null"]},
            candidates={"type": "array", "items": _object(["text", "score"], text={"type": "string"},
                                                          score={"type": "number"})},
            tags={"type": "array", "items": _object(["label", "score"], label={"type": "string"},
                                                    score={"type": "number"})},
            confidence={"type": ["number", "null"]}, needs_review={"type": ["boolean", "null"]},
            model_version={"type": ["string", "null"]},
            error={"oneOf": [{"type": "null"}, _object(["code", "message"], code={"type": ["string", "null"]},
                                                       message={"type": ["string", "null"]})]},
            source=TEXT, sha256={"type": ["string", "null"]}, size={"type": ["integer", "null"]},
            width={"type": ["integer", "null"]}, height={"type": ["integer", "null"]},
            created_at={"type": "string", "format": "date-time"},
            finished_at={"type": ["string", "null"], "format": "date-time"}),
        "Batch": _object(["id", "source", "total", "model_version", "counts", "created_at"],
                         id=INT, source=TEXT, total=INT, model_version=TEXT,
                         created_at={"type": "string", "format": "date-time"},
                         counts=_object(["queued", "processing", "done", "failed"],
                                        **{s: INT for s in ("queued", "processing", "done", "failed")})),
        "Results": _object(["query", "results"], query=TEXT, results={"type": "array", "items": _object(
            ["id", "source", "caption", "confidence", "model_version"], id=INT, source=TEXT,
            caption={"type": "string"}, confidence={"type": "number"}, model_version=TEXT)}),
        "Ready": _object(["status", "checks"], status={"type": "string", "enum": ["ready", "not ready"]},
                         checks={"type": "object", "additionalProperties": {"type": "string"}}),
    }},
}

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ spec.info.title }} API</title>
<style>body{font:15px/1.5 system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem}
code{background:#f3f3f3;padding:0 .3em}h2{margin-top:2rem;font-size:1.1rem}</style></head>
<body><h1>{{ spec.info.title }} API</h1><p>{{ spec.info.description }}</p>
<p>Every error is <code>{"error": {"code": "...", "message": "..."}}</code>.
Machine-readable: <a href="/openapi.json">/openapi.json</a>.</p>
{% for path, ops in spec.paths.items() %}{% for method, op in ops.items() %}
<h2><code>{{ method|upper }} {{ path }}</code></h2><p>{{ op.summary }}</p>
<p>Responses: {% for status in op.responses %}<code>{{ status }}</code> {% endfor %}</p>
{% endfor %}{% endfor %}</body></html>"""


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(SPEC)


@bp.get("/docs")
def docs_page() -> str:
    return render_template_string(PAGE, spec=SPEC)
