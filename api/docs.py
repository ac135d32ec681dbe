"""The OpenAPI document (/openapi.json) and a plain docs page rendered from it (/docs).
The page is served by us, not from a CDN, so it works on an offline network."""
from typing import Any

from flask import Blueprint, Response, jsonify, render_template_string

from captioner.core.export import FORMATS
from captioner.core.search import MAX_OFFSET, MAX_QUERY_CHARS
from captioner.core.tables import STATUSES

from . import MAX_ID
from .batches import MAX_LIMIT as MAX_LIST_LIMIT
from .bodies import BUCKET, KEY, PREFIX
from .search import MAX_LIMIT, QUERY

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
WRITE_METADATA = {"type": "string", "enum": ["sidecar"]}  # docs/metadata.md
# callback_url (README: Webhooks) is read by both submit operations but left out of their closed
# schemas: whether a URL is accepted depends on the server (CAPTIONER_WEBHOOK_SECRET) and on DNS,
# which no schema can state, so a schema-valid request could not promise acceptance
CALLBACK_NOTE = (" An optional `callback_url` (multipart or JSON field) receives a signed event when each image is "
                 "done or failed; 400 callback_url_refused for private addresses, 400 webhooks_not_configured "
                 "without CAPTIONER_WEBHOOK_SECRET.")
ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID}}]
# the lists of batches and of a batch's images page as /v1/search does: limit, offset, next_offset
PAGING = [{"name": "limit", "in": "query",
           "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT, "default": 20}},
          {"name": "offset", "in": "query",
           "schema": {"type": "integer", "minimum": 0, "maximum": MAX_ID, "default": 0}}]
STATUS = {"type": "string", "enum": list(STATUSES)}
NEXT_OFFSET = {"type": ["integer", "null"]}
# 403: an S3 bucket the service cannot read (missing or forbidden: one answer, so bucket names do not leak);
# 404: an S3 key that does not exist; 413: an upload over CAPTIONER_MAX_UPLOAD_BYTES or a JSON body over
# CAPTIONER_MAX_JSON_BYTES; 415: another media type
SUBMIT_ERRORS = _errors(400, 403, 404, 413, 415, 503)
SKIP_REASONS = ["hidden", "empty", "too_large", "not_an_image", "gone"]  # core/prefixes.py
SKIPPED = _object(["count", "reasons", "keys"], count=INT,
                  reasons={"type": "object", "additionalProperties": INT,
                           "propertyNames": {"enum": SKIP_REASONS}},
                  keys={"type": "array", "maxItems": 20,
                        "items": _object(["key", "reason"], key=TEXT, reason={"enum": SKIP_REASONS})})
# every /v1 operation: 401 without a valid key (with WWW-Authenticate), 403 for a scope the key
# lacks, 429 over the key's rate limit (with Retry-After)
KEYED: dict[str, Any] = {"security": [{"bearer": []}]}
KEY_ERRORS = _errors(401, 403, 429)
NULLABLE_TEXT = {"type": ["string", "null"]}
COUNTS = _object(list(STATUSES), **{s: INT for s in STATUSES})
# a person's alt text: no control characters, at least one character that is not white space.
# Not-white-space spelt out: Python's str.strip() and the JSON Schema (ECMA) `\S` disagree
# (\x1c-\x1f, \x85, \ufeff)
NOT_BLANK = "[^\\t\\n\\v\\f\\r \\x1c-\\x1f\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff]"
CONTROL = "\\x00-\\x1f\\x7f"
ALT_TEXT = {"type": "string", "maxLength": 1000,
            "pattern": f"^[^{CONTROL}]*{NOT_BLANK[:-1]}{CONTROL}][^{CONTROL}]*$"}
ALT_STATE = {"enum": ["generated", "needs_review", "approved", "edited", "decorative", None]}
ALT_ENTRY = _object(["text", "state", "model_version", "by", "at"], text={"type": "string"}, state=ALT_STATE,
                    model_version=NULLABLE_TEXT, by=NULLABLE_TEXT, at={"type": "string", "format": "date-time"})
HISTORY = {"type": "array", "items": ALT_ENTRY}
SUGGESTION = {"oneOf": [{"type": "null"}, ALT_ENTRY]}
# the estimated probability that the caption is right; null when the model has no fitted estimator
QUALITY = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
ALT_FIELDS = {"text": NULLABLE_TEXT, "state": ALT_STATE, "model_version": NULLABLE_TEXT, "by": NULLABLE_TEXT,
              "at": {"type": ["string", "null"]}, "suggestion": SUGGESTION, "history": HISTORY}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "captioner", "version": "1",
             "description": "Captions, alt text and tags for images. Submit, then poll until status is done."},
    "paths": {
        "/v1/images": {"post": {
            "summary": "Submit one image: an upload (multipart field `file`) or an S3 object",
            "description": CALLBACK_NOTE.strip(),
            "requestBody": {"required": True, "content": {
                "multipart/form-data": {"schema": _object(["file"], file={"type": "string", "format": "binary"},
                                                          queue=QUEUE)},
                "application/json": {"schema": _object(["s3"], s3=S3_OBJECT, queue=QUEUE)}}},
            "responses": {"202": _json({"$ref": "#/components/schemas/Accepted"}, "queued"),
                          "200": _json({"$ref": "#/components/schemas/Accepted"}, "already captioned by this model"),
                          **SUBMIT_ERRORS, **_errors(422), **KEY_ERRORS}, **KEYED}},
        "/v1/images/{id}": {"get": {
            "summary": "An image's status and, once done, its caption, alt text, candidates and tags",
            "parameters": ID,
            "responses": {"200": _json({"$ref": "#/components/schemas/Image"}, "the image"), **_errors(404),
                          **KEY_ERRORS}, **KEYED}},
        "/v1/images/{id}/retry": {"post": {
            "summary": "Queue the image's failed job again with a fresh attempt count (its error is kept in its "
                       "history); also how to retry after re-submitting the same bytes",
            "parameters": ID,
            "responses": {"202": _json({"$ref": "#/components/schemas/Image"}, "queued again"),
                          **_errors(404, 409), **KEY_ERRORS}, **KEYED}},
        "/v1/images/{id}/alt-text": {
            "get": {"summary": "The alt text to serve, its state, the newest suggestion and the history",
                    "parameters": ID,
                    "responses": {"200": _json({"$ref": "#/components/schemas/AltText"}, "the alt text"),
                                  **_errors(404), **KEY_ERRORS}, **KEYED},
            "patch": {
                "summary": "Record a person's decision: approved (the current suggestion), edited (new text) or "
                           "decorative (alt=\"\"); later re-captions never overwrite it",
                "parameters": ID,
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
                    _object(["state"], state={"const": "approved"}),
                    _object(["state", "text"], state={"const": "edited"}, text=ALT_TEXT),
                    _object(["state"], state={"const": "decorative"}, text={"const": ""})]}}}},
                "responses": {"200": _json({"$ref": "#/components/schemas/AltTextDecided"}, "recorded"),
                              **_errors(400, 404, 409, 413, 415), **KEY_ERRORS}, **KEYED}},
        "/v1/images/{id}/alt-text/history": {"get": {
            "summary": "Every suggestion and decision, oldest first", "parameters": ID,
            "responses": {"200": _json(_object(["history"], history=HISTORY), "the history"), **_errors(404),
                          **KEY_ERRORS}, **KEYED}},
        "/v1/batches": {"get": {
            "summary": "The tenant's batches, newest first, with counts per status",
            "parameters": PAGING,
            "responses": {"200": _json(_object(["batches", "next_offset"], next_offset=NEXT_OFFSET, batches={
                "type": "array", "items": {"$ref": "#/components/schemas/BatchSummary"}}), "a page of batches"),
                          **_errors(400), **KEY_ERRORS}, **KEYED}, "post": {
            "summary": "Submit every image under an S3 prefix, or a list of S3 objects",
            "description": "A prefix is listed and enqueued page by page; the same prefix again makes no new jobs. "
                           'With `"write_metadata": "sidecar"` the worker writes each caption as an XMP object '
                           "KEY.xmp beside its image." + CALLBACK_NOTE,
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
                _object(["s3"], queue=QUEUE, s3=S3_PREFIX, write_metadata=WRITE_METADATA),
                _object(["images"], queue=QUEUE, write_metadata=WRITE_METADATA,
                        images={"type": "array", "minItems": 1, "maxItems": 10000,
                                "items": _object(["s3"], s3=S3_OBJECT)})]}}}},
            # new_jobs, truncated and skipped come with a prefix: jobs made now (the rest existed), whether the
            # prefix held more than CAPTIONER_S3_PREFIX_LIMIT images (the first ones, in key order, were
            # taken), and the objects that are not images (chosen by their first bytes, not their names)
            "responses": {"202": _json(_object(["id", "total", "url"], id=INT, total=INT, url=TEXT, new_jobs=INT,
                                               truncated={"type": "boolean"}, skipped=SKIPPED), "queued"),
                          **SUBMIT_ERRORS, **KEY_ERRORS}, **KEYED}},
        "/v1/batches/{id}": {"get": {
            "summary": "Counts of a batch's images per status, and its failures by error code", "parameters": ID,
            "responses": {"200": _json({"$ref": "#/components/schemas/Batch"}, "the batch"), **_errors(404),
                          **KEY_ERRORS}, **KEYED}},
        "/v1/batches/{id}/images": {"get": {
            "summary": "A batch's images (those with one status, if given), oldest first: a failed one's error "
                       "code and message, a done one's caption",
            "parameters": [*ID, {"name": "status", "in": "query", "schema": STATUS}, *PAGING],
            "responses": {"200": _json(_object(["batch_id", "status", "images", "next_offset"], batch_id=INT,
                                               status={"enum": [*STATUSES, None]}, next_offset=NEXT_OFFSET,
                                               images={"type": "array",
                                                       "items": {"$ref": "#/components/schemas/BatchImage"}}),
                                       "a page of the batch's images"),
                          **_errors(400, 404), **KEY_ERRORS}, **KEYED}},
        "/v1/batches/{id}/cancel": {"post": {
            "summary": "Cancel a batch: its queued images fail with the code cancelled (workers skip them); those "
                       "being captioned finish, done ones stay. Idempotent; retrying the batch resumes them",
            "parameters": ID,
            "responses": {"200": _json(_object(["cancelled", "url"], cancelled=INT, url=TEXT),
                                       "how many queued images this call cancelled"),
                          **_errors(404), **KEY_ERRORS}, **KEYED}},
        "/v1/batches/{id}/retry": {"post": {
            "summary": "Queue the batch's failed jobs again (optionally only those that failed with one error code)",
            "parameters": ID,
            "requestBody": {"required": False, "content": {"application/json": {
                "schema": _object([], error={"type": "string", "maxLength": 64})}}},
            "responses": {"202": _json(_object(["retried", "url"], retried=INT, url=TEXT), "queued again"),
                          **_errors(400, 404, 415), **KEY_ERRORS}, **KEYED}},
        "/v1/search": {"get": {
            "summary": "Captioned images ranked by how well caption, alt text and tags match q",
            "description": "q holds words (stemmed: dogs finds dog), \"quoted phrases\" and -exclusions; "
                           "other characters only separate words. Every word and phrase must match; "
                           "exclusions alone match nothing. Page with offset and next_offset.",
            "parameters": [{"name": "q", "in": "query", "required": True,
                            "schema": {"type": "string", "maxLength": MAX_QUERY_CHARS, "pattern": QUERY}},
                           {"name": "limit", "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 20}},
                           {"name": "offset", "in": "query",
                            "schema": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0}}],
            "responses": {"200": _json({"$ref": "#/components/schemas/Results"}, "matches, best first"),
                          **_errors(400), **KEY_ERRORS}, **KEYED}},
        "/v1/export": {"get": {
            "summary": "Every caption with its image key, alt text and alt-text state, for CMS imports",
            "description": "Streamed, unpaginated: JSON lines (one object per caption) or CSV with a header row. "
                           "With include_failed=true, failed images too (state failed, no caption), and every "
                           "record has error_code and error_message.",
            "parameters": [{"name": "format", "in": "query",
                            "schema": {"type": "string", "enum": list(FORMATS), "default": "jsonl"}},
                           {"name": "model_version", "in": "query", "schema": {"type": "string"}},
                           {"name": "include_failed", "in": "query",
                            "schema": {"type": "string", "enum": ["true", "false", "1", "0"], "default": "false"}}],
            "responses": {"200": {"description": "the captions", "content": {
                "application/x-ndjson": {"schema": {"type": "string"}},
                "text/csv": {"schema": {"type": "string"}}}}, **_errors(400), **KEY_ERRORS}, **KEYED}},
        "/healthz": {"get": {"summary": "The process is alive",
                             "responses": {"200": _json(_object(["status"], status={"const": "ok"}), "ok")}}},
        "/readyz": {"get": {"summary": "Database, broker, storage and model are usable, and every queue "
                                       "holding jobs has a live worker",
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
    "components": {"securitySchemes": {"bearer": {
        "type": "http", "scheme": "bearer",
        "description": "An API key from `captioner keys create --tenant NAME --scope read|write|admin`; GET "
                       "routes need read, the others write. Not needed with CAPTIONER_AUTH=off."}}, "schemas": {
        "Error": _object(["error"], error=_object(["code", "message"], code=TEXT, message=TEXT)),
        "Accepted": _object(["id", "status", "queue", "model_version", "url"],
                            id=INT, status={"type": "string", "enum": ["queued", "processing", "done", "failed"]},
                            queue=QUEUE, model_version=TEXT, url=TEXT),
        "Image": _object(
            ["id", "status", "caption", "alt_text", "alt_text_state", "alt_text_suggestion", "alt_text_history",
             "candidates", "tags", "confidence", "quality", "needs_review", "model_version", "error", "source", "sha256",
             "size",
             "width", "height", "created_at", "finished_at"],
            id=INT, status={"type": "string", "enum": ["queued", "processing", "done", "failed"]},
            caption={"type": ["string", "null"]}, alt_text={"type": ["string", "null"]}, alt_text_state=ALT_STATE,
            alt_text_suggestion=SUGGESTION, alt_text_history=HISTORY,
            candidates={"type": "array", "items": _object(["text", "score"], text={"type": "string"},
                                                          score={"type": "number"})},
            tags={"type": "array", "items": _object(["label", "score"], label={"type": "string"},
                                                    score={"type": "number"})},
            confidence={"type": ["number", "null"]}, quality=QUALITY, needs_review={"type": ["boolean", "null"]},
            model_version={"type": ["string", "null"]},
            error={"oneOf": [{"type": "null"}, _object(["code", "message"], code={"type": ["string", "null"]},
                                                       message={"type": ["string", "null"]})]},
            source=TEXT, sha256={"type": ["string", "null"]}, size={"type": ["integer", "null"]},
            width={"type": ["integer", "null"]}, height={"type": ["integer", "null"]},
            created_at={"type": "string", "format": "date-time"},
            finished_at={"type": ["string", "null"], "format": "date-time"}),
        "Batch": _object(["id", "source", "total", "model_version", "counts", "failures", "images_per_second",
                          "eta_seconds", "created_at"],
                         id=INT, source=TEXT, total=INT, model_version=TEXT, counts=COUNTS,
                         failures={"type": "object", "additionalProperties": INT},
                         images_per_second={"type": ["number", "null"]}, eta_seconds={"type": ["number", "null"]},
                         created_at={"type": "string", "format": "date-time"}),
        "BatchSummary": _object(["id", "source", "total", "model_version", "counts", "created_at", "url"],
                                id=INT, source=TEXT, total=INT, model_version=TEXT, counts=COUNTS,
                                created_at={"type": "string", "format": "date-time"}, url=TEXT),
        "BatchImage": _object(["id", "source", "status", "error", "caption", "url"], id=INT, source=TEXT,
                              status=STATUS, caption={"type": ["string", "null"]}, url=TEXT,
                              error={"oneOf": [{"type": "null"}, _object(["code", "message"],
                                                                         code={"type": ["string", "null"]},
                                                                         message={"type": ["string", "null"]})]}),
        "AltText": _object(list(ALT_FIELDS), **ALT_FIELDS),
        "AltTextDecided": _object([*ALT_FIELDS, "warnings"], **ALT_FIELDS,
                                  warnings={"type": "array", "items": {"type": "string"}}),
        "Results": _object(["query", "results", "next_offset"], query=TEXT,
                           next_offset={"type": ["integer", "null"]}, results={"type": "array", "items": _object(
            ["id", "source", "caption", "alt_text", "tags", "score", "confidence", "quality", "model_version"], id=INT,
            source=TEXT, caption={"type": "string"}, alt_text={"type": "string"},
            tags={"type": "array", "items": _object(["label", "score"], label={"type": "string"},
                                                    score={"type": "number"})},
            score={"type": "number"}, confidence={"type": "number"}, quality=QUALITY, model_version=TEXT)}),
        "Ready": _object(["status", "checks", "queues"], status={"type": "string", "enum": ["ready", "not ready"]},
                         checks={"type": "object", "additionalProperties": {"type": "string"}},
                         queues={"type": "object", "description": "per job queue; empty when the database is down",
                                 "additionalProperties": _object(
                                     ["queued", "oldest_queued_seconds", "workers"], queued={"type": "integer"},
                                     oldest_queued_seconds={"type": "number"}, workers={"type": "integer"})}),
    }},
}

METHODS = ("get", "put", "post", "delete", "patch")


def _method_not_allowed(paths: dict[str, dict[str, Any]]) -> None:
    """Every method a path does not serve answers 405 with an Allow header, key or no key. OpenAPI
    has no place for the answer to an operation that does not exist, so each operation of the
    path lists it: a client looking up DELETE /v1/batches/{id} finds that only GET is served there
    (and POST /v1/batches/{id}/cancel beside it)."""
    for path, item in paths.items():
        served = ", ".join(m.upper() for m in METHODS if m in item)
        refused = {**_errors(405)["405"], "description": f"another method than {served} on {path}",
                   "headers": {"Allow": {"description": "the methods this path serves", "schema": {"type": "string"}}}}
        for op in item.values():
            op["responses"]["405"] = refused


_method_not_allowed(SPEC["paths"])

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ spec.info.title }} API</title>
<style>body{font:15px/1.5 system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem}
code{background:#f3f3f3;padding:0 .3em}h2{margin-top:2rem;font-size:1.1rem}</style></head>
<body><h1>{{ spec.info.title }} API</h1><p>{{ spec.info.description }}</p>
<p>Every error is <code>{"error": {"code": "...", "message": "..."}}</code>.
Every <code>/v1</code> route needs <code>Authorization: Bearer KEY</code> (a key from
<code>captioner keys create</code>).
Machine-readable: <a href="/openapi.json">/openapi.json</a>.</p>
<p>Any other method on a path answers <code>405</code> with an <code>Allow</code> header.</p>
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
