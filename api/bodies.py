"""Request bodies -> core values; every problem is an InvalidRequest (400) naming the bad field."""
from typing import Any

from flask import request

from core.errors import InvalidRequest
from core.tables import QUEUES

MAX_LIST = 10_000  # images in one JSON batch; larger sets go by S3 prefix


def json_object() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object (Content-Type: application/json)")
    return body


def queue(value: Any, default: str) -> str:
    if value is None:
        return default
    if value not in QUEUES:
        raise InvalidRequest(f"queue must be one of {', '.join(QUEUES)}")
    return value


def s3_location(value: Any, field: str, key_name: str, allow_empty: bool = False) -> tuple[str, str]:
    """{"bucket": B, key_name: K} -> (B, K), with a message that names the bad field."""
    if not isinstance(value, dict):
        raise InvalidRequest(f"{field} must be an object with bucket and {key_name}")
    bucket, key = value.get("bucket"), value.get(key_name, "" if allow_empty else None)
    if not isinstance(bucket, str) or not bucket:
        raise InvalidRequest(f"{field}.bucket must be a non-empty string")
    if not isinstance(key, str) or (not key and not allow_empty):
        raise InvalidRequest(f"{field}.{key_name} must be a{'' if allow_empty else ' non-empty'} string")
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
        out.append(s3_location(item["s3"], f"images[{n}].s3", "key"))
    return out
