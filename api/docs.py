"""The OpenAPI document (/openapi.json) and a plain docs page rendered from it (/docs).
The page is served by us, not from a CDN, so it works on an offline network."""
from typing import Any

from flask import Blueprint, Response, jsonify, render_template_string

bp = Blueprint("docs", __name__)

ERROR = {"$ref": "#/components/schemas/Error"}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": "error", "content": {"application/json": {"schema": ERROR}}} for s in statuses}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


S3_KEY = {"type": "object", "required": ["bucket", "key"],
          "properties": {"bucket": {"type": "string"}, "key": {"type": "string"}}}
QUEUE = {"type": "string", "enum": ["interactive", "backfill"]}
ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}]

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "captioner", "version": "1",
             "description": "Captions, alt text and tags for images. Submit, then poll until status is done."},
    "paths": {
        "/v1/images": {"post": {
            "summary": "Submit one image: an upload (multipart field `file`) or an S3 object",
            "requestBody": {"required": True, "content": {
                "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                    "file": {"type": "string", "format": "binary"}, "queue": QUEUE}}},
                "application/json": {"schema": {"type": "object", "required": ["s3"], "properties": {
                    "s3": S3_KEY, "queue": QUEUE}}}}},
            "responses": {"202": _json({"$ref": "#/components/schemas/Accepted"}, "queued"),
                          "200": _json({"$ref": "#/components/schemas/Accepted"}, "already captioned by this model"),
                          **_errors(400, 404, 413, 422, 503)}}},
        "/v1/images/{id}": {"get": {
            "summary": "An image's status and, once done, its caption, alt text, candidates and tags",
            "parameters": ID,
            "responses": {"200": _json({"$ref": "#/components/schemas/Image"}, "the image"), **_errors(404)}}},
        "/v1/batches": {"post": {
            "summary": "Submit every image under an S3 prefix, or a list of S3 objects",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
                {"type": "object", "required": ["s3"], "properties": {"queue": QUEUE, "s3": {
                    "type": "object", "required": ["bucket"],
                    "properties": {"bucket": {"type": "string"}, "prefix": {"type": "string"}}}}},
                {"type": "object", "required": ["images"], "properties": {"queue": QUEUE, "images": {
                    "type": "array", "maxItems": 10000,
                    "items": {"type": "object", "required": ["s3"], "properties": {"s3": S3_KEY}}}}}]}}}},
            "responses": {"202": _json({"type": "object", "properties": {
                "id": {"type": "integer"}, "total": {"type": "integer"}, "url": {"type": "string"}}}, "queued"),
                **_errors(400, 404, 503)}}},
        "/v1/batches/{id}": {"get": {
            "summary": "Counts of a batch's images per status", "parameters": ID,
            "responses": {"200": _json({"$ref": "#/components/schemas/Batch"}, "the batch"), **_errors(404)}}},
        "/v1/search": {"get": {
            "summary": "Captioned images whose caption contains every word of q",
            "parameters": [{"name": "q", "in": "query", "required": True, "schema": {"type": "string"}},
                           {"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 100}}],
            "responses": {"200": _json({"type": "object"}, "matches, most confident first"), **_errors(400)}}},
        "/healthz": {"get": {"summary": "The process is alive", "responses": {"200": _json({"type": "object"}, "ok")}}},
        "/readyz": {"get": {"summary": "Database, broker, storage and model are usable",
                            "responses": {"200": _json({"type": "object"}, "ready"),
                                          "503": _json({"type": "object"}, "not ready, with the failing checks")}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _json({"type": "object"}, "")}}},
        "/docs": {"get": {"summary": "This document as a page", "responses": {"200": {"description": "HTML"}}}},
    },
    "components": {"schemas": {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
        "Accepted": {"type": "object", "properties": {
            "id": {"type": "integer"}, "status": {"type": "string"}, "queue": QUEUE,
            "model_version": {"type": "string"}, "url": {"type": "string"}}},
        "Image": {"type": "object", "properties": {
            "id": {"type": "integer"},
            "status": {"type": "string", "enum": ["queued", "processing", "done", "failed"]},
            "caption": {"type": ["string", "null"]}, "alt_text": {"type": ["string", "null"]},
            "candidates": {"type": "array", "items": {"type": "object", "properties": {
                "text": {"type": "string"}, "score": {"type": "number"}}}},
            "tags": {"type": "array", "items": {"type": "object", "properties": {
                "label": {"type": "string"}, "score": {"type": "number"}}}},
            "confidence": {"type": ["number", "null"]}, "needs_review": {"type": ["boolean", "null"]},
            "model_version": {"type": ["string", "null"]},
            "error": {"oneOf": [{"type": "null"}, {"type": "object", "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}}}]},
            "source": {"type": "string"}, "sha256": {"type": ["string", "null"]},
            "size": {"type": ["integer", "null"]}, "width": {"type": ["integer", "null"]},
            "height": {"type": ["integer", "null"]}, "created_at": {"type": "string"},
            "finished_at": {"type": ["string", "null"]}}},
        "Batch": {"type": "object", "properties": {
            "id": {"type": "integer"}, "source": {"type": "string"}, "total": {"type": "integer"},
            "model_version": {"type": "string"}, "created_at": {"type": "string"},
            "counts": {"type": "object", "properties": {
                s: {"type": "integer"} for s in ("queued", "processing", "done", "failed")}}}},
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
