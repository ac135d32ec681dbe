"""Request bodies -> core values; every problem is an InvalidRequest (400) naming the bad field, or
a 415 when the body is not of a media type the route reads. The OpenAPI document in api/docs.py
states the same rules; the schemathesis suite holds the two together."""
import json
import re
from collections.abc import Collection
from typing import Any

from flask import request
from werkzeug.exceptions import BadRequest, UnsupportedMediaType

from captioner.core import webhooks
from captioner.core.errors import InvalidRequest, TooLarge
from captioner.core.settings import Settings
from captioner.core.tables import QUEUES

from . import services

MAX_LIST = 10_000  # images in one JSON batch; larger sets go by S3 prefix
# the bucket names boto3 will send (botocore's own check), starting with a letter or digit as S3
# requires: "." or ".." would address a path segment, never a bucket
BUCKET = r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,254}$"
# S3's own limit is 1024 UTF-8 bytes; control characters are refused by S3 servers (SeaweedFS
# answers 400 to a NUL) and a NUL could never be stored in PostgreSQL as part of the image's uri
KEY = r"^[^\x00-\x1f\x7f]{1,1024}$"
PREFIX = r"^[^\x00-\x1f\x7f]{0,1024}$"


def int_arg(name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter (limit, offset), within bounds."""
    try:
        value = int(request.args.get(name, default))
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}")
    return value


def flag_arg(name: str) -> bool:
    """A boolean query parameter: true or false (1 or 0), false when absent."""
    value = request.args.get(name, "false")
    if value not in ("true", "false", "1", "0"):
        raise InvalidRequest(f"{name} must be true or false")
    return value in ("true", "1")


def known_fields(value: dict[str, Any], where: str, allowed: Collection[str]) -> None:
    """Refuse a field we do not read: a typo (`"queu"`) must not be silently ignored."""
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise InvalidRequest(f"unknown field {where}{unknown[0]}; allowed: {', '.join(allowed)}")


def json_object(allowed: Collection[str]) -> dict[str, Any]:
    if not request.is_json:
        raise UnsupportedMediaType(f"send the body as application/json, not {request.mimetype or 'nothing'}")
    max_bytes = services().settings.max_json_bytes
    if (request.content_length or 0) > max_bytes:
        raise TooLarge(f"a JSON body may have at most {max_bytes} bytes (CAPTIONER_MAX_JSON_BYTES); "
                       "submit more images at once by S3 prefix")
    request.max_content_length = max_bytes  # a body sent without a length is cut off there too (413)
    try:
        body = request.get_json()
        json.dumps(body, ensure_ascii=False).encode()  # "\ud800" parses, but no database or S3 key holds it
    except BadRequest:  # Flask's own parse error; ours names the problem in our shape
        raise InvalidRequest("the body is not valid JSON") from None
    except RecursionError:  # the parser's own limit on nesting
        raise InvalidRequest("the body nests too deeply") from None
    except UnicodeEncodeError:
        raise InvalidRequest("the body holds a lone surrogate (\\ud800-\\udfff), which is not Unicode text") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    known_fields(body, "", allowed)
    return body


def upload() -> tuple[bytes, str | None]:
    """(the bytes, the file name) of the multipart field `file`; `queue` and `callback_url` are the
    only other fields read."""
    fields = {**request.form, **request.files}
    if None in fields:  # werkzeug's key for a part whose Content-Disposition has no name
        raise InvalidRequest("every multipart part needs a name")
    known_fields(fields, "", ("file", "queue", "callback_url"))
    if "file" not in request.files:
        raise InvalidRequest("multipart uploads need the image in a file field named 'file'")
    file = request.files["file"]
    return file.read(), file.filename


def callback_url(value: Any, settings: Settings) -> str | None:
    """An optional callback URL: refused unless events can be signed and it reaches a public address."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest("callback_url must be an http(s) URL string")
    return webhooks.check_callback(value, settings)


def write_metadata(value: Any) -> str:
    """The workers write S3 sidecars only: an object is never rewritten in place (docs/metadata.md)."""
    if value != "sidecar":
        raise InvalidRequest('write_metadata must be "sidecar" (an XMP object beside each image) or absent')
    return value


def queue(value: Any) -> str:
    if value not in QUEUES:
        raise InvalidRequest(f"queue must be one of {', '.join(QUEUES)}")
    return value


def s3_location(value: Any, field: str, key_name: str, allow_empty: bool = False) -> tuple[str, str]:
    """{"bucket": B, key_name: K} -> (B, K), with a message that names the bad field."""
    if not isinstance(value, dict):
        raise InvalidRequest(f"{field} must be an object with bucket and {key_name}")
    known_fields(value, f"{field}.", ("bucket", key_name))
    bucket, key = value.get("bucket"), value.get(key_name, "" if allow_empty else None)
    if not isinstance(bucket, str) or not re.fullmatch(BUCKET, bucket):
        raise InvalidRequest(f"{field}.bucket must be an S3 bucket name (a letter or digit, then letters, "
                             "digits, '.', '-', '_')")
    if not isinstance(key, str) or not re.fullmatch(PREFIX if allow_empty else KEY, key):
        raise InvalidRequest(f"{field}.{key_name} must be a string of {0 if allow_empty else 1} to 1024 "
                             "characters, none of them control characters")
    return bucket, key


def image_list(value: Any) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise InvalidRequest("images must be a non-empty list of {\"s3\": {\"bucket\", \"key\"}}")
    if len(value) > MAX_LIST:
        raise InvalidRequest(f"at most {MAX_LIST} images per batch; use an S3 prefix for more")
    out = []
    for n, item in enumerate(value):
        if not isinstance(item, dict) or "s3" not in item:
            raise InvalidRequest(f"images[{n}] must be {{\"s3\": {{\"bucket\", \"key\"}}}}")
        known_fields(item, f"images[{n}].", ("s3",))
        out.append(s3_location(item["s3"], f"images[{n}].s3", "key"))
    return out
