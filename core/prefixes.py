"""Which objects under an S3 prefix are images. Every listed object is a candidate and is chosen by
its first bytes (a ranged read of storage.HEAD_BYTES), checked against the signatures the decoder
accepts, never by its name: a camera's IMG_1.MPO, a `.jfif`, a file without an extension or a
renamed `photo.JPG.bak` are photos; `notes.jpg` holding text is not. What is left out is counted
and named, so a caller sees why a prefix of 10 objects made a batch of 6."""
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

from . import decode, storage
from .errors import InvalidRequest, NotFound

# Concurrent ranged reads while sorting a listed page: each waits on the store, not on the CPU
# (obstore runs them off the GIL). A 1,000-key page takes one round trip's time per 32 keys.
HEAD_THREADS = 32
SKIPPED_KEYS_SHOWN = 20  # keys named in an answer; `count` and `reasons` cover every one


@dataclass
class Skipped:
    """Objects under a prefix that were not taken, with why: hidden (a dot-name, as the folder walk
    skips), empty (0 bytes), too_large (over CAPTIONER_MAX_UPLOAD_BYTES), not_an_image (no known
    image signature) or gone (deleted between the listing and the read)."""
    count: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    keys: list[dict[str, str]] = field(default_factory=list)  # the first SKIPPED_KEYS_SHOWN: {"key", "reason"}

    def add(self, key: str, reason: str) -> None:
        self.count += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.keys) < SKIPPED_KEYS_SHOWN:
            self.keys.append({"key": key, "reason": reason})

    def as_dict(self) -> dict:
        return {"count": self.count, "reasons": dict(sorted(self.reasons.items())), "keys": list(self.keys)}

    def summary(self) -> str:
        """'3 objects skipped (2 not_an_image, 1 empty)', or '' when none were."""
        if not self.count:
            return ""
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.reasons.items()))
        return f"{self.count} object{'s' if self.count != 1 else ''} skipped ({why})"


def _hidden(obj: storage.S3Object, prefix: str) -> bool:
    # below the prefix only: a prefix the caller named, dots and all, is what they asked for
    return any(part.startswith(".") for part in obj.key[len(prefix):].split("/"))


def _reason(obj: storage.S3Object, prefix: str, max_bytes: int, trust_suffixes: bool) -> str | None:
    """Why an object is not an image judging by its listing alone; "" to take it on its name (only
    with trust_suffixes: CAPTIONER_S3_SNIFF=unnamed), None to read its first bytes."""
    if _hidden(obj, prefix):
        return "hidden"
    if obj.size == 0:
        return "empty"
    if obj.size > max_bytes:
        return "too_large"
    if trust_suffixes and obj.key.lower().endswith(storage.IMAGE_SUFFIXES):
        return ""
    return None


def _content_reason(obj: storage.S3Object) -> str | None:
    try:
        head = storage.read_head(obj)
    except NotFound:
        return "gone"
    return None if decode.signature(head) else "not_an_image"


def choose(page: list[storage.S3Object], prefix: str, max_bytes: int, pool: Executor, skipped: Skipped,
           trust_suffixes: bool = False) -> list[storage.S3Object]:
    """The images of one listed page, in key order; the rest are added to `skipped`."""
    listed = [(obj, _reason(obj, prefix, max_bytes, trust_suffixes)) for obj in page]
    to_read = [obj for obj, reason in listed if reason is None]
    read = dict(zip((o.key for o in to_read), pool.map(_content_reason, to_read)))
    images = []
    for obj, reason in listed:
        reason = read[obj.key] if reason is None else reason
        if reason:
            skipped.add(obj.key, reason)
        else:
            images.append(obj)
    return images


def image_pages(bucket: str, prefix: str, max_bytes: int, skipped: Skipped,
                trust_suffixes: bool = False) -> Iterator[list[storage.S3Object]]:
    """The images under s3://bucket/prefix, one listed page at a time (bounded memory)."""
    with ThreadPoolExecutor(HEAD_THREADS, thread_name_prefix="s3-head") as pool:
        for page in storage.list_pages(bucket, prefix):
            yield choose(page, prefix, max_bytes, pool, skipped, trust_suffixes)


def images(bucket: str, prefix: str, max_bytes: int, limit: int, skipped: Skipped,
           trust_suffixes: bool = False) -> list[storage.S3Object]:
    """Every image under a prefix, refusing more than `limit`."""
    out: list[storage.S3Object] = []
    for page in image_pages(bucket, prefix, max_bytes, skipped, trust_suffixes):
        out.extend(page)
        if len(out) > limit:
            raise InvalidRequest(f"s3://{bucket}/{prefix} holds more than {limit} images; "
                                 "split it into smaller prefixes", code="too_many_images")
    return out
