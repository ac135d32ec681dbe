"""`captioner bench pipeline`: captions/s of the whole service against the model alone, on the same photos.

- raw: the model on tensors decoded beforehand, at the best batch size (the ceiling);
- end_to_end: photos in S3 (SeaweedFS) -> POST /v1/batches on the HTTP API -> Redis -> one batching
  `captioner worker` -> PostgreSQL, timed from the request until the last job's finished_at;
- naive: the same path with captioner.bench.naive_worker: one task and one model call per image.

Each distributed run gets a fresh PostgreSQL database on the configured server and a warm worker
(its first batch is run before the clock starts), so only steady-state throughput is compared."""
import json
import logging
import multiprocessing
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

from captioner.core import captioner, decode, storage
from . import seaweed
from captioner.core.queue import create_celery
from captioner.core.settings import Settings

WARMUP = 4  # photos captioned before the clock starts: loads the model, warms the first forward
DEADLINE_S = 1800


@dataclass(frozen=True)
class Row:
    path: str
    captions_s: float
    seconds: float
    images: int
    note: str


def raw(settings: Settings, photos: list[Path], batch_sizes: list[int], log: Callable[[str], None]) -> tuple[Row, int]:
    """Captions/s of encoder + beam search per batch size on pre-decoded tensors -> (best row, its batch size).
    Measured in a process of its own: with the model and 480 tensors held here, the worker's
    forwards ran 12-15 % slower in the end-to-end run that followed (four alternating runs)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        rates = pool.submit(_rates, settings, photos, batch_sizes).result()
    for bs, rate in rates.items():
        log(f"raw batch {bs}: {rate:.2f} captions/s")
    best = max(rates, key=rates.__getitem__)
    tried = ", ".join(f"{bs}: {r:.1f}" for bs, r in rates.items())
    return Row("raw", rates[best], len(photos) / rates[best], len(photos), f"tried {tried}"), best


def _rates(settings: Settings, photos: list[Path], batch_sizes: list[int]) -> dict[int, float]:
    tensors = [captioner.preprocess(decode.decode(p.read_bytes(), settings.max_pixels)) for p in photos]
    captioner.caption_batch(settings, tensors[:WARMUP])  # allocations, kernels, caches
    rates = {}
    for bs in batch_sizes:
        started = time.perf_counter()
        for i in range(0, len(tensors), bs):
            captioner.caption_batch(settings, tensors[i:i + bs])
        rates[bs] = len(tensors) / (time.perf_counter() - started)
    return rates


@contextmanager
def _database(server_url: str) -> Iterator[str]:
    """A fresh, migrated database on the configured PostgreSQL server, dropped afterwards."""
    from sqlalchemy import create_engine, text

    from captioner.migrations import upgrade

    base = urlsplit(server_url)
    name = f"captioner_bench_{secrets.token_hex(4)}"
    admin = create_engine(urlunsplit(base._replace(scheme="postgresql+psycopg")), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = urlunsplit(base._replace(path=f"/{name}"))
    try:
        upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def s3_bucket(root: Path) -> Iterator[str]:
    """A SeaweedFS on loopback with one bucket; the AWS_* variables point boto3 at it meanwhile."""
    server = seaweed.SeaweedFS(root)
    server.start()
    saved = {name: os.environ.get(name) for name in server.env}
    os.environ.update(server.env)  # boto3, obstore and the worker processes started later read them
    storage.s3_client.cache_clear()
    bucket = "bench"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                storage.s3_client().create_bucket(Bucket=bucket)
                break
            except Exception:  # connection refused or 5xx while SeaweedFS starts
                if not server.running() or time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS did not start: {server.log_tail()}")
                time.sleep(0.5)
        yield bucket
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        storage.s3_client.cache_clear()


@contextmanager
def _api(settings: Settings) -> Iterator[str]:
    """The Flask app under werkzeug's threaded server, in this process -> its base URL."""
    from werkzeug.serving import make_server

    from captioner.api import create_app

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per poll would drown the table
    server = make_server("127.0.0.1", 0, create_app(settings), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def _http(method: str, url: str, key: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read())


def _run_batch(base: str, key: str, bucket: str, prefix: str, expected: int, workers: list[subprocess.Popen],
               logs: list[Path], poll: Callable[[], None] = lambda: None) -> None:
    """POST the S3 prefix as a batch and wait until every job is done or failed.
    `poll` runs at every check (the scale-out bench samples the database's connections)."""
    started = time.perf_counter()
    batch = _http("POST", f"{base}/v1/batches", key, {"s3": {"bucket": bucket, "prefix": prefix}})
    if batch["total"] != expected:
        raise RuntimeError(f"expected {expected} photos under {prefix}, the API found {batch['total']}")
    while True:
        counts = _http("GET", f"{base}/v1/batches/{batch['id']}", key)["counts"]
        if counts["done"] + counts["failed"] == expected:
            return
        if any(w.poll() is not None for w in workers) or time.perf_counter() - started > DEADLINE_S:
            raise RuntimeError(f"a worker stopped or too slow ({counts}): {logs[0].read_text()[-3000:]}")
        poll()
        time.sleep(0.25)  # 240 polls a minute: under the API's default per-key rate limit


def _client_key(db_url: str, bucket: str) -> str:
    """A write key for a tenant allowed to read the bucket: the API checks both as in production."""
    from captioner.core.auth import allow_bucket, create_key
    from captioner.core.db import make_engine, make_sessionmaker

    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine).begin() as s:
            _, key = create_key(s, "bench", "write")
            allow_bucket(s, "bench", bucket)
    finally:
        engine.dispose()
    return key


@dataclass(frozen=True)
class Run:
    # from the request until the last job was finished, by its finished_at: the poll that sees it
    # comes up to 0.25 s later, which is 2 % of a 480-photo run at 45 captions/s
    seconds: float
    logs: list[Path]  # one per worker process
    redelivered: int  # jobs claimed more than once
    captions: int  # caption rows written (one per image: more would be duplicates)
    peak_connections: int  # most PostgreSQL connections to the run's database seen at once


def distributed(settings: Settings, bucket: str, count: int, worker_argv: list[str], batch_size: int,
                forward_size: int, workdir: Path, workers: int = 1, threads: int | None = None) -> Run:
    """`count` photos under s3://bucket/photos/ through the API and `workers` worker processes
    started with `worker_argv` (each with `threads` torch threads if given), after a warm-up batch
    under warmup/, on a fresh database."""
    from sqlalchemy import func, select, text

    from captioner.core.db import make_engine
    from captioner.core.tables import Caption, Job, utcnow

    with _database(settings.database_url) as db_url:
        phase = replace(settings, database_url=db_url, storage=f"s3://{bucket}/uploads", batch_size=batch_size,
                        forward_size=forward_size)
        create_celery(phase).control.purge()  # leftovers of an aborted run would inflate the count
        key = _client_key(db_url, bucket)
        env = {**os.environ, "CAPTIONER_DATABASE_URL": db_url, "CAPTIONER_BROKER_URL": phase.broker_url or "",
               "CAPTIONER_STORAGE": phase.storage, "CAPTIONER_BATCH_SIZE": str(batch_size),
               "CAPTIONER_FORWARD_SIZE": str(forward_size),
               "CAPTIONER_MODEL_PATH": str(captioner.checkpoint_path(settings)), "CAPTIONER_WORKER_METRICS_PORT": "",
               "CAPTIONER_RUNTIME": settings.runtime}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in each worker
        logs = [workdir / f"worker-{secrets.token_hex(3)}.log" for _ in range(workers)]
        procs = []
        for i, log_path in enumerate(logs):
            with open(log_path, "wb") as out:
                argv = [a.replace("{n}", str(i + 1)) for a in worker_argv]
                procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=out, stderr=subprocess.STDOUT))
        engine = make_engine(db_url)
        peak = [0]

        def sample() -> None:
            with engine.connect() as conn:
                n = conn.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"))
            peak[0] = max(peak[0], n - 1)  # not this sampling connection

        try:
            with _api(phase) as base:
                _run_batch(base, key, bucket, "warmup/", WARMUP, procs, logs)
                started = utcnow()
                _run_batch(base, key, bucket, "photos/", count, procs, logs, sample)
            with engine.connect() as conn:
                seconds = (conn.scalar(select(func.max(Job.finished_at))) - started).total_seconds()
                redelivered = conn.scalar(select(func.count()).where(Job.attempts > 1))
                captions = conn.scalar(select(func.count()).select_from(Caption))
            return Run(seconds, logs, redelivered, captions - WARMUP, peak[0])
        finally:
            engine.dispose()
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def resized(photos: list[Path], megapixels: float, folder: Path) -> list[Path]:
    """The photos re-encoded as 4:3 JPEGs of `megapixels` (12: 4000x3000, as phones make them), in `folder`."""
    with ProcessPoolExecutor() as pool:
        return list(pool.map(_resize, photos, [megapixels] * len(photos), [folder] * len(photos), chunksize=8))


def _resize(photo: Path, megapixels: float, folder: Path) -> Path:
    from PIL import Image

    height = round((megapixels * 1e6 * 3 / 4) ** 0.5)
    out = folder / photo.name
    with Image.open(photo) as im:
        im.convert("RGB").resize((height * 4 // 3, height), Image.Resampling.BICUBIC).save(out, quality=90)
    return out


def bench(settings: Settings, photos: list[Path], batch_sizes: list[int], log: Callable[[str], None],
          rounds: int = 2) -> list[Row]:
    """The three rows on the same photos (photos[:WARMUP] warm up): the raw sweep, then `rounds`
    rounds of end_to_end, naive and raw again. Each path's row is its best run: on this shared
    host the same command varied by up to 30 % within minutes (raw 54-72 captions/s), and other
    tenants only ever slow a run down. raw, measured once more than the others, is favoured."""
    if settings.embedded or not settings.database_url.startswith("postgresql"):
        raise ValueError("set CAPTIONER_BROKER_URL (Redis) and CAPTIONER_DATABASE_URL (a PostgreSQL server "
                         "where databases may be created)")
    warmup, measured = photos[:WARMUP], photos[WARMUP:]
    sweep, best = raw(settings, measured, batch_sizes, log)
    rates: dict[str, list[float]] = {"raw": [sweep.captions_s], "end_to_end": [], "naive": []}
    with tempfile.TemporaryDirectory(prefix="captioner-bench-") as tmp, s3_bucket(Path(tmp)) as bucket:
        client = storage.s3_client()
        for prefix, group in (("warmup/", warmup), ("photos/", measured)):
            for p in group:
                client.put_object(Bucket=bucket, Key=prefix + p.name, Body=p.read_bytes())
        # two forwards per batch at least: the second's photos are fetched and decoded while the first runs
        size = max(captioner.batch_size(settings), 2 * best)
        runs = {"end_to_end": (["-m", "captioner.cli", "worker", "--no-beat", "--loglevel", "warning"], size, best),
                "naive": (["-m", "celery", "-A", "captioner.bench.naive_worker", "worker", "--pool", "prefork", "--concurrency", "1",
                           "--queues", "interactive,backfill", "--loglevel", "warning"], 1, 1)}
        for _ in range(rounds):
            for name, (argv, bs, forward) in runs.items():
                rates[name].append(len(measured) / distributed(settings, bucket, len(measured), argv, bs, forward,
                                                                Path(tmp)).seconds)
                log(f"{name}: {rates[name][-1]:.2f} captions/s")
            rates["raw"].append(raw(settings, measured, [best], log)[0].captions_s)
    notes = {"raw": f"forwards of {best} ({sweep.note})",
             "end_to_end": f"1 batching worker, batches of {size}, forwards of {best}",
             "naive": "1 worker process, 1 task and 1 forward per image"}
    rows = []
    for name, runs_of in rates.items():
        rate = max(runs_of)
        tried = ", ".join(f"{r:.1f}" for r in runs_of)
        rows.append(Row(name, rate, len(measured) / rate, len(measured), f"best of {tried}; {notes[name]}"))
    return rows


def summary(rows: list[Row]) -> dict[str, float]:
    rate = {r.path: r.captions_s for r in rows}
    return {"raw": round(rate["raw"], 2), "end_to_end": round(rate["end_to_end"], 2), "naive": round(rate["naive"], 2),
            "end_to_end_over_raw": round(rate["end_to_end"] / rate["raw"], 3),
            "end_to_end_over_naive": round(rate["end_to_end"] / rate["naive"], 3)}
