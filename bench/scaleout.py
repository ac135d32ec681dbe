"""`captioner bench scaleout`: 1, 2, 4 ... worker processes on one broker and one database.

What a fleet shares is the broker, the database and the object store; the model runs apart on
each GPU. So by default the workers run the tiny random-weight model (model.train) on small
re-encodings of real photos: each image then costs the shared services and the worker's own
bookkeeping (claim, fetch, decode, write, ack, events), and the run shows how that part scales
and what it costs the database. With `--checkpoint` and full-size photos it measures the real
model instead, which on one CPU host only shares the same cores out differently.

Every run: a fresh database, the same photos, `count` jobs submitted as one S3 prefix batch
through the HTTP API, timed until all are done. It also reports the spread of images between the
workers, jobs claimed twice, caption rows beyond one per image and the peak database connections."""
import io
import os
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from PIL import Image

from captioner.core import storage
from captioner.core.settings import Settings

from .pipeline import WARMUP, distributed, s3_bucket


@dataclass(frozen=True)
class Row:
    workers: int
    threads: int  # torch threads per worker
    captions_s: float
    seconds: float
    images: int
    per_worker: list[int]  # images each worker captioned, from its log (the warm-up's included)
    redelivered: int
    extra_captions: int  # caption rows beyond one per image: must be 0
    peak_connections: int
    stages: dict[str, float]  # share of the workers' batch time: model, write, the rest (claim excluded)


def shrink(data: bytes, side: int) -> bytes:
    """A photo re-encoded with its longest side at `side` pixels (JPEG, quality 90)."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        im.thumbnail((side, side))
        out = io.BytesIO()
        im.save(out, "JPEG", quality=90)
        return out.getvalue()


def _captioned(log: Path) -> int:
    return sum(int(n) for n in re.findall(r"(\d+) captioned in forwards", log.read_text(errors="replace")))


def _stages(logs: list[Path]) -> dict[str, float]:
    """Shares of the batches' time, from the workers' log lines: `in T s (model M s, write W s)`;
    the rest is fetching and decoding that the model did not hide."""
    found = [tuple(map(float, m)) for p in logs
             for m in re.findall(r"in ([\d.]+)s \(model ([\d.]+)s, write ([\d.]+)s\)", p.read_text(errors="replace"))]
    total = sum(t for t, _, _ in found) or 1.0
    model, write = sum(m for _, m, _ in found) / total, sum(w for _, _, w in found) / total
    return {"model": model, "write": write, "rest": 1.0 - model - write}


def bench(settings: Settings, photos: list[Path], counts: list[int], side: int | None, batch_size: int,
          log: Callable[[str], None]) -> list[Row]:
    """One row per worker count in `counts`, on the same photos (photos[:WARMUP] warm up)."""
    if settings.embedded or not settings.database_url.startswith("postgresql"):
        raise ValueError("set CAPTIONER_BROKER_URL (Redis) and CAPTIONER_DATABASE_URL (a PostgreSQL server "
                         "where databases may be created)")
    cores = len(os.sched_getaffinity(0))
    warmup, measured = photos[:WARMUP], photos[WARMUP:]
    rows = []
    with tempfile.TemporaryDirectory(prefix="captioner-scaleout-") as tmp, s3_bucket(Path(tmp)) as bucket:
        client = storage.s3_client()
        for prefix, group in (("warmup/", warmup), ("photos/", measured)):
            for p in group:
                data = p.read_bytes()
                client.put_object(Bucket=bucket, Key=prefix + p.name, Body=shrink(data, side) if side else data)
        for n in counts:
            threads = max(1, cores // n)  # this host's cores shared out between its workers
            argv = ["-m", "captioner.cli", "worker", "--no-beat", "--loglevel", "info", "--hostname", "scaleout{n}@%h"]
            run = distributed(settings, bucket, len(measured), argv, batch_size, batch_size, Path(tmp),
                              workers=n, threads=threads)
            per_worker = [_captioned(p) for p in run.logs]
            rows.append(Row(n, threads, len(measured) / run.seconds, run.seconds, len(measured), sorted(per_worker),
                            run.redelivered, run.captions - len(measured), run.peak_connections, _stages(run.logs)))
            log(f"{n} workers: {rows[-1].captions_s:.1f} captions/s")
    return rows


def run(settings: Settings, photos: list[Path], counts: list[int], side: int | None, batch_size: int,
        checkpoint: str | None, log: Callable[[str], None]) -> list[Row]:
    """`bench` with `checkpoint`, or by default the tiny random-weight model: then the shared
    services, not the model, are what the rows measure."""
    from captioner.model.train import export_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="captioner-tiny-") as tmp:
        model_path = checkpoint or str(export_tiny_checkpoint(Path(tmp)))
        return bench(replace(settings, model_path=model_path), photos, counts, side, batch_size, log)


def table(rows: list[Row]) -> list[str]:
    base = rows[0].captions_s
    lines = [f"{'workers':>7} {'threads':>7} {'captions/s':>10} {'speed-up':>8} {'seconds':>8} {'images':>6} "
             f"{'redelivered':>11} {'extra rows':>10} {'db conns':>8} {'model/write/rest':>16}  images per worker"]
    for r in rows:
        stages = "/".join(f"{100 * r.stages[k]:.0f}%" for k in ("model", "write", "rest"))
        lines.append(f"{r.workers:>7} {r.threads:>7} {r.captions_s:>10.1f} {r.captions_s / base:>8.2f} "
                     f"{r.seconds:>8.2f} {r.images:>6} {r.redelivered:>11} {r.extra_captions:>10} "
                     f"{r.peak_connections:>8} {stages:>16}  {r.per_worker}")
    return lines
