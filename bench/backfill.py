"""Keys/s that a whole-library backfill enqueues from an S3 prefix: the database rows and the broker
doorbells of POST /v1/batches, on a scratch bucket, database and broker."""
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from captioner.core import backfill, captioner, storage
from captioner.core.queue import publisher
from captioner.core.settings import Settings
from captioner.migrations import open_database

JPEG_START = b"\xff\xd8\xff\xe0"


def fill(bucket: str, prefix: str, keys: int, threads: int) -> float | None:
    """Upload `keys` tiny objects under the prefix unless it holds that many -> seconds, or None."""
    client = storage.s3_client()
    if sum(len(page) for page in storage.list_pages(bucket, prefix)) >= keys:
        return None
    started = time.perf_counter()
    names = [f"{prefix}{n:07d}.jpg" for n in range(keys)]
    # a JPEG's first bytes: the enqueue reads each object's start to tell images from other files
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=JPEG_START + k.encode()), names))
    return time.perf_counter() - started


def run(settings: Settings, bucket: str, prefix: str, keys: int, threads: int,
        log: Callable[[str], None]) -> backfill.Enqueued:
    uploaded = fill(bucket, prefix, keys, threads)
    if uploaded is not None:
        log(f"uploaded {keys} objects in {uploaded:.1f}s")
    return backfill.enqueue_prefix(open_database(settings.database_url), bucket, prefix, captioner.version(settings),
                                   "backfill", publisher(settings), keys, settings.max_upload_bytes,
                                   trust_suffixes=settings.s3_sniff == "unnamed")
