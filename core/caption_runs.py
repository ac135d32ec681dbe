"""A `captioner caption` run from start to end: submit files, folders and S3 prefixes, caption them
here (embedded mode) or follow the workers (distributed), and summarise the batch."""
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from sqlalchemy.orm import sessionmaker

from . import jobs, queries, storage
from .errors import InvalidRequest
from .prefixes import Skipped
from .queries import NewImage, Submitted
from .queue import Publish
from .settings import Settings
from .tables import Image

POLL_SECONDS = 1.0


@dataclass(frozen=True)
class Summary:
    total: int
    counts: dict[str, int]  # status -> jobs of the batch
    captioned_now: int
    already: int  # done before this run began
    failures: dict[str | None, int]  # error code -> images
    samples: list[tuple[str, str]]  # (file name, caption) of the first images

    @property
    def left(self) -> int:
        return self.counts["queued"] + self.counts["processing"]


def submit(sm: sessionmaker, settings: Settings, paths: Iterable[str], limit: int | None, queue: str,
           model_version: str, publish: Publish) -> tuple[int, list[Submitted], Skipped]:
    """Every image under `paths` as one batch -> (batch id, submitted, objects under S3 prefixes
    that are not images). With a broker, local files are first copied to CAPTIONER_STORAGE:
    workers on other hosts cannot read this machine's disk."""
    paths = list(paths)
    skipped = Skipped()
    images = list(jobs.expand_paths(paths, limit, settings.s3_prefix_limit, settings.max_upload_bytes, skipped,
                                    settings.s3_sniff == "unnamed"))
    if not images:
        raise InvalidRequest(f"no images found in {' '.join(paths)}"
                             + (f" ({skipped.summary()})" if skipped.count else ""),
                             code="empty_batch" if skipped.count else None)
    if not settings.embedded:
        images = [_shared(settings, i) if i.uri.startswith("file://") else i for i in images]
    batch_id, submitted = jobs.submit_images(sm, images, model_version, queue, publish, batch_source=" ".join(paths))
    assert batch_id is not None, "a batch source always makes a batch"
    return batch_id, submitted, skipped


def _shared(settings: Settings, image: NewImage) -> NewImage:
    uri, _ = storage.store(settings.storage, storage.read(image.uri, settings.max_upload_bytes))
    # the copy is stored under its hash: the file's own name stays its source
    return NewImage(uri, image.fingerprint, image.sha256, image.size, storage.public_source(image.uri))


def pending(submitted: list[Submitted]) -> tuple[int, int]:
    """(jobs already done, jobs still to caption) among the submitted, each job counted once."""
    unique = {x.job_id: x for x in submitted}.values()
    return (sum(1 for x in unique if x.status == "done"),
            sum(1 for x in unique if x.status in ("queued", "processing")))


def finish(sm: sessionmaker, settings: Settings, model_version: str, batch_id: int, todo: int,
           progress: Callable[[int], None]) -> None:
    """Caption the batch in this process (embedded), or wait for the workers to (distributed);
    `progress` gets the images finished since its last call. Ctrl-C while following stops the
    watching, not the work."""
    if settings.embedded:
        jobs.run_embedded(sm, settings, model_version, batch_id, lambda r: progress(r.captioned + r.failed))
        return
    seen = 0
    while True:
        with sm() as s:
            counts = queries.batch_view(s, batch_id)["counts"]
        finished = todo - counts["queued"] - counts["processing"]
        if finished > seen:
            progress(finished - seen)
            seen = finished
        if counts["queued"] + counts["processing"] == 0:
            return
        time.sleep(POLL_SECONDS)


def summary(sm: sessionmaker, batch_id: int, model_version: str, submitted: list[Submitted], already: int,
            samples: int) -> Summary:
    with sm() as s:
        view = queries.batch_view(s, batch_id)
        failures = queries.failures_by_code(s, batch_id)
        shown = s.execute(queries.results_query(model_version).where(
            Image.id.in_([x.image_id for x in submitted[:samples]]))).all()
    counts = view["counts"]
    return Summary(view["total"], counts, counts["done"] - already, already, failures,
                   [(image.name or Path(image.uri).name, caption.text) for image, caption, _ in shown])
