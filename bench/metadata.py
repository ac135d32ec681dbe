"""`captioner bench metadata`: what writing XMP sidecars adds to a `captioner caption` run, measured
in one run on the same photos: the embedded pipeline captions them (timed), then the metadata step
reads each file and writes its sidecar (timed), as `caption --write-metadata sidecar` does."""
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from captioner.core import caption_runs, captioner, metadata
from captioner.core.settings import Settings
from captioner.migrations import open_database


def run(settings: Settings, photos: list[Path], mode: str = "sidecar",
        progress: Callable[[int], None] = lambda n: None) -> dict[str, float]:
    """-> {photos, caption_s, metadata_s, overhead_pct, ms_per_file}, on a fresh SQLite database and a
    folder of links to the photos (the sidecars land beside the links, never beside the originals)."""
    with tempfile.TemporaryDirectory(prefix="captioner-bench-metadata-") as work:
        folder = Path(work) / "photos"
        folder.mkdir()
        for p in photos:
            (folder / p.name).symlink_to(p.resolve())
        local = replace(settings, database_url=f"sqlite:///{work}/captioner.db", broker_url=None,
                        storage=f"{work}/store")
        sm = open_database(local.database_url)
        version = captioner.version(local)
        with metadata.exiftool_processes() as tools:
            started = time.perf_counter()
            batch_id, submitted, _ = caption_runs.submit(sm, local, [str(folder)], None, "backfill", version,
                                                      lambda jobs: None)
            _, todo = caption_runs.pending(submitted)
            caption_runs.finish(sm, local, version, batch_id, todo, progress)
            caption_s = time.perf_counter() - started
            started = time.perf_counter()
            metadata.import_descriptions(sm, tools[0], [str(folder)])
            report = metadata.write_files(sm, tools, [str(folder)], mode, model_version=version)
            metadata_s = time.perf_counter() - started
        written = sum(report.counts[k] for k in ("sidecar", "embedded", "fell_back_to_sidecar"))
        if written != len(photos):
            raise RuntimeError(f"wrote {written} of {len(photos)} files: {dict(report.counts)}")
    return {"photos": len(photos), "caption_s": round(caption_s, 2), "metadata_s": round(metadata_s, 2),
            "overhead_pct": round(100 * metadata_s / caption_s, 1),
            "ms_per_file": round(1000 * metadata_s / len(photos), 2)}
