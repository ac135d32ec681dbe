"""The job life-cycle end to end: submit (store bytes, rows, doorbell) and caption a claimed
batch (fetch and decode overlapping the model forwards, a write as each forward ends). The worker and the embedded CLI share it."""
import hashlib
import logging
import os
import secrets
import time
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator

from sqlalchemy.orm import sessionmaker

from . import captioner, decode, prefixes, queries, storage, webhooks
from .errors import CaptioningError, InvalidRequest, TransientError
from .prefixes import Skipped
from .queries import Claimed, Doorbell, Failure, NewImage, Result, Submitted
from .queue import Publish
from .settings import Settings

log = logging.getLogger(__name__)
# Pauses before fetching again the images of a batch that storage failed transiently (15 s in
# all, on top of boto3's own quick retries): without them a storage restart of a few seconds
# burns one attempt per batch until max_attempts fails every job in flight.
FETCH_RETRY_SECONDS = (1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class BatchReport:
    captioned: int
    failed: int
    released: int  # returned to the queue after a transient error
    forward_size: int  # the largest model forward of the batch
    seconds: float
    finished: tuple[int, ...] = ()  # job ids now done or failed
    events: tuple[int, ...] = ()  # outbox rows of their callbacks, written with them: to deliver
    batch: str = ""  # this forward's id, in every log line about it
    # job id -> "done", "requeued" or the error code it failed with: per-request task events
    outcomes: dict[int, str] = field(default_factory=dict)
    # stage -> seconds: fetch and decode per image (on threads, so they overlap), model and write per batch
    stages: dict[str, list[float]] = field(default_factory=dict)


def to_publish(submitted: Iterable[Submitted]) -> list[Doorbell]:
    return list(dict.fromkeys(Doorbell(s.job_id, s.queue, s.image_id) for s in submitted if s.status == "queued"))


def stored_upload(settings: Settings, data: bytes, filename: str | None = None) -> NewImage:
    """Uploaded bytes, checked to be an image and stored -> the image to submit, named by the
    file name it was sent with (sanitised; the bytes are stored under their hash whatever it is)."""
    decode.sniff(data, settings.max_pixels)  # refuse junk now, with a clear error, not later in a worker
    uri, digest = storage.store(settings.storage, data)
    return NewImage(uri, f"sha256:{digest}", digest, len(data), storage.upload_name(filename))


def submit_upload(sm: sessionmaker, settings: Settings, data: bytes, model_version: str, queue: str,
                  publish: Publish, tenant: str = "default", callback_url: str | None = None,
                  filename: str | None = None) -> Submitted:
    image = stored_upload(settings, data, filename)
    with sm.begin() as s:
        [sub] = queries.submit(s, [image], model_version, queue, tenant)
        if callback_url:
            queries.set_callback(s, [sub.job_id], callback_url)
    publish(to_publish([sub]))
    return sub


def s3_image(obj: storage.S3Object) -> NewImage:
    # the ETag stands in for the content hash: reading every object at submit time would cost a download
    return NewImage(obj.uri, f"s3:{obj.bucket}/{obj.key}@{obj.etag}", None, obj.size)


def file_image(path: Path) -> NewImage:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    return NewImage(path.resolve().as_uri(), f"sha256:{digest}", digest, len(data))


def submit_images(sm: sessionmaker, images: list[NewImage], model_version: str, queue: str,
                  publish: Publish, batch_source: str | None = None, tenant: str = "default",
                  callback_url: str | None = None,
                  write_metadata: str | None = None) -> tuple[int | None, list[Submitted]]:
    """Rows for images (and a batch grouping them, given its source) in one transaction, then the
    doorbell -> (batch id or None, submitted). The callback goes on the batch, or on the job of a
    single image."""
    with sm.begin() as s:
        submitted = queries.submit(s, images, model_version, queue, tenant)
        batch_id = None
        if batch_source is not None:
            batch_id = queries.create_batch(s, batch_source, model_version, (x.image_id for x in submitted), tenant,
                                            callback_url, write_metadata).id
        elif callback_url:
            queries.set_callback(s, [x.job_id for x in submitted], callback_url)
    publish(to_publish(submitted))
    return batch_id, submitted


def expand_paths(paths: Iterable[str], limit: int | None, s3_limit: int, max_bytes: int,
                 skipped: Skipped, trust_suffixes: bool = False) -> Iterator[NewImage]:
    """Files, folders (recursively, image suffixes only, hidden files and folders skipped: macOS's
    `._IMG.jpg`, a metadata write's temporary copy) and s3://bucket/prefix (every object, chosen by
    its first bytes; those left out are added to `skipped`) -> images."""
    count = 0
    for raw in paths:
        if raw.startswith("s3://"):
            bucket, prefix = storage.split_s3(raw)
            found: Iterable[NewImage] = (s3_image(o) for o in prefixes.images(bucket, prefix, max_bytes, s3_limit,
                                                                               skipped, trust_suffixes))
        else:
            path = Path(raw)
            if path.is_dir():
                found = (file_image(p) for p in sorted(path.rglob("*"))
                         if p.is_file() and p.suffix.lower() in storage.IMAGE_SUFFIXES
                         and not any(part.startswith(".") for part in p.relative_to(path).parts))
            elif path.is_file():
                found = [file_image(path)]
            else:
                raise InvalidRequest(f"{raw}: no such file or folder")
        for image in found:
            if limit is not None and count >= limit:
                return
            count += 1
            yield image


@dataclass(frozen=True)
class _Prepared:
    claimed: Claimed
    tensor: Any = None  # (3, 224, 224), or None when the image failed or waits for the device decoder
    size: tuple[int, int] = (0, 0)  # the photo's upright width, height (not the draft-mode decode's)
    error: CaptioningError | None = None
    fetch_s: float = 0.0
    decode_s: float = 0.0  # bytes -> model input tensor
    jpeg: bytes | None = None  # a baseline JPEG left for the model's device to decode
    orientation: int = 1  # its EXIF orientation
    sha256: str | None = None  # of the bytes read, for an image whose digest was not known (an S3 object)


def _prepare(settings: Settings, claimed: Claimed, on_device: bool) -> _Prepared:
    """Fetch, decode and preprocess one image on an I/O thread; an error fails this image only.
    With `on_device`, a baseline JPEG is only checked (header, limits) and left for the device."""
    t0 = time.perf_counter()
    try:
        data = storage.read(claimed.uri, settings.max_upload_bytes)
    except CaptioningError as e:
        return _Prepared(claimed, error=e, fetch_s=time.perf_counter() - t0)
    # hashed here, where the bytes are read anyway (hashlib releases the GIL): an S3 object's
    # digest was unknown at submit time, which read only its listing
    digest = hashlib.sha256(data).hexdigest() if claimed.sha256 is None or settings.crash_on_sha256 else None
    t1 = time.perf_counter()
    if settings.crash_on_sha256 and digest == settings.crash_on_sha256:
        os._exit(70)  # the fault suite's poison image: the whole process dies, as in a decoder crash
    learnt = digest if claimed.sha256 is None else None
    try:
        jpeg = decode.baseline_jpeg(data, settings.max_pixels) if on_device else None
        if jpeg is not None:
            orientation, size = jpeg
            return _Prepared(claimed, size=size, fetch_s=t1 - t0, decode_s=time.perf_counter() - t1, jpeg=data,
                             orientation=orientation, sha256=learnt)
        image = decode.decode(data, settings.max_pixels)
        tensor = captioner.preprocess(image)
    except CaptioningError as e:
        return _Prepared(claimed, error=e, fetch_s=t1 - t0, decode_s=time.perf_counter() - t1, sha256=learnt)
    return _Prepared(claimed, tensor, image.info["source_size"], fetch_s=t1 - t0, decode_s=time.perf_counter() - t1,
                     sha256=learnt)


def _decode_on_device(settings: Settings, waiting: list[_Prepared]) -> list[_Prepared]:
    """Decode the JPEGs left for the device as one batch; one it refuses goes through Pillow."""
    pending = [i for i, p in enumerate(waiting) if p.jpeg is not None]
    if not pending:
        return waiting
    started = time.perf_counter()
    tensors = captioner.decode_jpegs(settings, [(waiting[i].jpeg, waiting[i].orientation) for i in pending])
    share = (time.perf_counter() - started) / len(pending)
    out = list(waiting)
    for i, tensor in zip(pending, tensors, strict=True):
        p = replace(out[i], jpeg=None, tensor=tensor, decode_s=out[i].decode_s + share)
        if tensor is None:  # nvJPEG refuses some files libjpeg reads; Pillow names what is wrong with a corrupt one
            try:
                p = replace(p, tensor=captioner.preprocess(decode.decode(out[i].jpeg, settings.max_pixels)))
            except CaptioningError as e:
                p = replace(p, error=e)
        out[i] = p
    return out


@dataclass
class _Written:
    """What a batch wrote so far, a forward at a time."""
    results: int = 0
    failures: int = 0
    finished: list[int] = field(default_factory=list)  # job ids done or failed
    events: list[int] = field(default_factory=list)  # outbox rows of their callbacks
    outcomes: dict[int, str] = field(default_factory=dict)  # job id -> "done" or the error code
    seconds: float = 0.0


class _Progress:
    """Writes a claimed batch's outcome a forward at a time: the forward's jobs show as processing
    when it begins (their lease was taken at the claim), its captions and the failures found
    since the last write are committed when it ends. Progress and the rate then move per forward,
    not per claimed batch; each write is one short transaction, with no model work inside it."""

    def __init__(self, sm: sessionmaker, settings: Settings, batch: str):
        self.sm, self.settings, self.batch = sm, settings, batch
        self.written = _Written()

    def started(self, forward: list[_Prepared]) -> None:
        started = time.perf_counter()
        with self.sm.begin() as s:
            queries.mark_started(s, [p.claimed.job_id for p in forward])
        self.written.seconds += time.perf_counter() - started

    def finished(self, captioned: list[tuple[_Prepared, Any]], errored: list[_Prepared],
                 retry: Collection[int] = ()) -> None:
        """Write a forward's captions and the failures among `errored`; a transient error is left
        for the batch's retries unless it is in `retry` (job ids out of retries: failed)."""
        final = [p for p in errored if not isinstance(p.error, TransientError) or p.claimed.job_id in retry]
        if not captioned and not final:
            return
        started = time.perf_counter()
        results = [Result(p.claimed, cap.text, cap.alt_text, cap.candidates, cap.tags, cap.confidence,
                          cap.needs_review, *p.size, sha256=p.sha256, quality=cap.quality) for p, cap in captioned]
        failures = [Failure(p.claimed, p.error.code, p.error.message, p.sha256) for p in final if p.error]
        done = [r.claimed.job_id for r in results] + [f.claimed.job_id for f in failures]
        with self.sm.begin() as s:  # short transaction: no model work inside it
            queries.complete(s, results, failures, captioner.get(self.settings).version, forward_size=len(results))
            self.written.events += webhooks.record_events(s, done)  # the outbox: committed with the jobs or not at all
        w = self.written
        w.seconds += time.perf_counter() - started
        w.results, w.failures, w.finished = w.results + len(results), w.failures + len(failures), w.finished + done
        w.outcomes.update({r.claimed.job_id: "done" for r in results})
        w.outcomes.update({f.claimed.job_id: f.code for f in failures})
        for f in failures:
            log.warning("image %d (%s): %s %s", f.claimed.image_id, f.claimed.uri, f.code, f.message,
                        extra={"image_id": f.claimed.image_id, "job_id": f.claimed.job_id, "batch_id": self.batch,
                               "error_code": f.code})
        for r in results:
            log.info("image %d captioned", r.claimed.image_id,
                     extra={"image_id": r.claimed.image_id, "job_id": r.claimed.job_id, "batch_id": self.batch})


def _forwards(settings: Settings, prepared: Iterable[_Prepared],
              progress: _Progress) -> tuple[list[_Prepared], list[int], float]:
    """Caption images in model forwards of forward_size as they come off the I/O pool: the pool
    goes on fetching and decoding the next forward's images while this one runs, and each
    forward's outcome is written as it ends. -> (every image, forward sizes, model seconds)."""
    size = captioner.forward_size(settings)
    seen: list[_Prepared] = []
    errored: list[_Prepared] = []  # failed since the last write
    sizes: list[int] = []
    waiting: list[_Prepared] = []
    model_s = 0.0
    for p in chain(prepared, [None]):  # None: the end, which runs the last, partial forward
        if p is not None:
            if p.error:
                seen.append(p)
                errored.append(p)
            else:
                waiting.append(p)
        if waiting and (len(waiting) == size or p is None):
            waiting = _decode_on_device(settings, waiting)
            seen += waiting
            errored += [w for w in waiting if w.error is not None]
            ready = [w for w in waiting if w.error is None]
            captioned: list[tuple[_Prepared, Any]] = []
            if ready:
                progress.started(ready)
                started = time.perf_counter()
                captioned = list(zip(ready, captioner.caption_batch(settings, [w.tensor for w in ready]), strict=True))
                model_s += time.perf_counter() - started
                sizes.append(len(ready))
            progress.finished(captioned, errored)
            errored = [e for e in errored if isinstance(e.error, TransientError)]  # left for the retries
            waiting = []
    if errored:  # failures after the last forward
        progress.finished([], errored)
    return seen, sizes, model_s


def caption_claimed(sm: sessionmaker, settings: Settings, claimed: list[Claimed]) -> BatchReport:
    """Caption claimed jobs: concurrent fetch and decode overlapping the model forwards, each
    forward's outcome written as it ends (one short transaction each)."""
    started = time.perf_counter()
    batch = secrets.token_hex(6)
    if not claimed:
        return BatchReport(0, 0, 0, 0, 0.0, batch=batch)

    on_device = captioner.decodes_on_device(settings)
    progress = _Progress(sm, settings, batch)

    def prepare(c: Claimed) -> _Prepared:
        return _prepare(settings, c, on_device)

    try:
        with captioner.io_pool(min(settings.io_threads, len(claimed))) as pool:
            # Executor.map submits every image at once and yields them in order as they finish
            prepared, sizes, model_s = _forwards(settings, pool.map(prepare, claimed), progress)
            for delay in FETCH_RETRY_SECONDS:  # the batch waits out a storage restart together
                again = [p.claimed for p in prepared if isinstance(p.error, TransientError)]
                if not again:
                    break
                log.warning("storage unavailable for %d images, fetching them again in %g s", len(again), delay)
                time.sleep(delay)
                retried = _forwards(settings, pool.map(prepare, again), progress)
                prepared = [p for p in prepared if not isinstance(p.error, TransientError)] + retried[0]
                sizes += retried[1]
                model_s += retried[2]
            # a transient error (S3 hiccup) returns the image to the queue, until its attempts run out
            transient = [p for p in prepared if isinstance(p.error, TransientError)]
            out_of_attempts = {p.claimed.job_id for p in transient if p.claimed.attempts >= settings.max_attempts}
            progress.finished([], [p for p in transient if p.claimed.job_id in out_of_attempts], out_of_attempts)
    except BaseException as e:
        # give the claims back now rather than after the lease (those written stay done or
        # failed); an interrupt is not the images' fault
        with sm.begin() as s:
            queries.release(s, [c.job_id for c in claimed], count_attempt=not isinstance(e, KeyboardInterrupt))
        raise
    requeued = [p.claimed.job_id for p in transient if p.claimed.job_id not in out_of_attempts]
    if requeued:
        with sm.begin() as s:
            queries.release(s, requeued, count_attempt=True)
    w = progress.written
    outcomes = {**w.outcomes, **{job_id: "requeued" for job_id in requeued}}
    stages = {"fetch": [p.fetch_s for p in prepared], "decode": [p.decode_s for p in prepared if p.decode_s],
              "model": [model_s], "write": [w.seconds]}
    return BatchReport(w.results, w.failures, len(requeued), max(sizes, default=0), time.perf_counter() - started,
                       tuple(w.finished), tuple(w.events), batch, outcomes, stages)


def run_embedded(sm: sessionmaker, settings: Settings, model_version: str, batch_id: int | None,
                 on_batch: Callable[[BatchReport], None]) -> None:
    """Claim and caption queued jobs in-process until none are left (of the batch, if given).
    The model loads with the first claimed batch: a run with nothing to do stays quick."""
    with sm.begin() as s:
        queries.sweep(s, settings.max_attempts, settings.requeue_after_seconds)  # leases of a killed run
        left = webhooks.overdue(s, settings.requeue_after_seconds)  # events an earlier run could not send
    webhooks.deliver_inline(sm, settings, left)
    while True:
        with sm.begin() as s:
            claimed = queries.claim(s, model_version, settings.lease_seconds, captioner.batch_size(settings),
                                    batch_id=batch_id)
        if not claimed:
            return
        report = caption_claimed(sm, settings, claimed)
        webhooks.deliver_inline(sm, settings, list(report.events))  # no broker: no retry queue either
        on_batch(report)
