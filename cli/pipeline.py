"""The library commands: caption, recaption, search, export."""
import json

import click

from . import context
from .metadata import echo_report, metadata_options


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--limit", type=int, default=None, help="Caption at most this many images.")
@click.option("--queue", type=click.Choice(["interactive", "backfill"]), default="backfill", show_default=True,
              help="Broker queue (distributed mode only).")
@click.option("--wait/--no-wait", default=False, help="Distributed mode: follow the batch until it is done.")
@click.option("--samples", type=int, default=5, show_default=True, help="Captions to show at the end.")
@click.option("--write-metadata", "write_metadata", type=click.Choice(["sidecar", "embed"]), default=None,
              help="Also write caption, alt text and keywords as XMP: a NAME.EXT.xmp sidecar, or into the file "
                   "(local files; needs exiftool). A description a person wrote is imported, never overwritten.")
@metadata_options
@context.runtime_option
def caption(paths, limit, queue, wait, samples, write_metadata, sidecar_name, overwrite, runtime) -> None:
    """Caption image files, folders and s3://bucket/prefix locations.

    With no broker configured (CAPTIONER_BROKER_URL unset) this runs the whole pipeline in this
    process on the SQLite database, skipping images this model already captioned, so a second run
    is quick and an interrupted run resumes. With a broker it submits the images for the workers
    (uploading local files to CAPTIONER_STORAGE first), prints the batch id and, with --wait,
    follows the batch to the end (the workers caption in their own CAPTIONER_RUNTIME).
    """
    import time
    from contextlib import nullcontext

    from tqdm import tqdm

    from captioner.core import caption_runs, captioner, metadata
    from captioner.core.db import shown
    from captioner.core.queue import publisher

    settings = context.with_runtime(context.settings(), runtime)
    if write_metadata and not settings.embedded and not wait:
        raise click.UsageError("--write-metadata with a broker needs --wait: the files are written once captioned")
    if write_metadata and any(p.startswith("s3://") for p in paths):
        raise click.UsageError("--write-metadata writes local files; S3 images get sidecars from a batch with "
                               '"write_metadata": "sidecar", or from captioner write-metadata s3://...')
    with context.reported(), (metadata.exiftool_processes() if write_metadata else nullcontext()) as tools:
        sm = context.database(settings)
        version = captioner.version(settings)
        started = time.perf_counter()
        batch_id, submitted, skipped = caption_runs.submit(sm, settings, paths, limit, queue, version,
                                                           publisher(settings))
        if skipped.count:
            click.echo(f"{skipped.summary()}: " + ", ".join(f"{k['key']} ({k['reason']})" for k in skipped.keys)
                       + (", ..." if skipped.count > len(skipped.keys) else ""))
        if write_metadata:
            imported = metadata.import_descriptions(sm, tools[0], paths, naming=sidecar_name, limit=limit)
            if imported:
                click.echo(f"{imported} descriptions people wrote imported as approved alt text")
        if not settings.embedded:
            click.echo(f"batch {batch_id}: {len({x.image_id for x in submitted})} images submitted to the workers")
            if not wait:
                return
        already, todo = caption_runs.pending(submitted)
        with tqdm(total=todo, unit="img", desc="captioning", disable=todo == 0) as bar:
            caption_runs.finish(sm, settings, version, batch_id, todo, bar.update)
        written = metadata.write_files(sm, tools, paths, write_metadata, sidecar_name, model_version=version,
                                       overwrite=overwrite, limit=limit) if write_metadata else None
        elapsed = time.perf_counter() - started
        done = caption_runs.summary(sm, batch_id, version, submitted, already, samples)
    rate = f", {done.captioned_now / elapsed:.1f} captions/s" if done.captioned_now else ""
    click.echo(f"{done.total} images: {done.counts['done']} done ({done.captioned_now} captioned now, "
               f"{done.already} already), {done.counts['failed']} failed, {done.left} left; "
               f"{elapsed:.1f}s{rate}; model {version}")
    for code, n in sorted(done.failures.items()):
        click.echo(f"  failed: {n} x {code}")
    for name, text in done.samples:
        click.echo(f"  {name}: {text}")
    if written is not None:
        echo_report(written)
    click.echo(f"database: {shown(settings.database_url)}  (try: captioner search WORDS, captioner export)")


@click.command()
@click.option("--from-version", default=None,
              help="Only images captioned by this model version (default: by any version but the current one).")
@click.option("--all", "every_image", is_flag=True,
              help="Every image without a job for the current model, captioned before or not.")
@click.option("--tenant", default="default", show_default=True, help="Whose images.")
def recaption(from_version, every_image, tenant) -> None:
    """Re-queue images captioned by an older model as backfill jobs for the current model.

    The new caption is stored beside the old one and served from then on; alt text a person
    approved, edited or marked decorative stays. With a broker the workers do the work (the batch
    id is printed: follow it with GET /v1/batches/<id>); without one it runs here.
    """
    from tqdm import tqdm

    from captioner.core import backfill, caption_runs, captioner, queries
    from captioner.core.queue import publisher

    settings = context.settings()
    with context.reported():
        sm = context.database(settings)
        version = captioner.version(settings)
        done = backfill.recaption(sm, version, publisher(settings), from_version, every_image, tenant)
        if done.batch_id is None:
            click.echo(f"nothing to re-caption: every image has a job for model {version}")
            return
        click.echo(f"batch {done.batch_id}: {done.total} images queued for model {version}")
        if settings.embedded:
            with tqdm(total=done.new_jobs, unit="img", desc="re-captioning") as bar:
                caption_runs.finish(sm, settings, version, done.batch_id, done.new_jobs, bar.update)
            with sm() as s:
                counts = queries.batch_view(s, done.batch_id, tenant)["counts"]
            click.echo(f"{counts['done']} done, {counts['failed']} failed")


@click.command()
@click.argument("words", nargs=-1, required=True)
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True, help="Skip this many matches (paging).")
@click.option("--tenant", default="default", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per match.")
def search(words, limit, offset, tenant, as_json) -> None:
    """Captioned images ranked by how well caption, alt text and tags match WORDS.

    Words are stemmed (dogs finds dog); "quoted phrases" must match as written; -word excludes.
    Put -- before a query that starts with an exclusion: captioner search -- -cat dog
    """
    from captioner.core import search as search_index

    with context.reported(), context.database(context.settings())() as s:
        rows = search_index.query_index(s, " ".join(words), limit, offset, tenant)
    for row in rows:
        click.echo(json.dumps(row) if as_json else
                   f"{row['id']:>7}  {row['score']:.3f}  {row['caption']}  {row['source']}")
    if not rows and not as_json:
        click.echo("no matches", err=True)


@click.command()
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option("--output", type=click.File("w", encoding="utf-8"), default="-", show_default=True)
@click.option("--model-version", default=None, help="Only captions of this model version.")
@click.option("--tenant", default="default", show_default=True)
@click.option("--include-failed", is_flag=True,
              help="Also failed images: state failed, no caption, and error_code and error_message columns.")
def export(fmt, output, model_version, tenant, include_failed) -> None:
    """Write every caption with its image key, alt text, state, candidates and tags (for CMS imports)."""
    from captioner.core import export as exporter

    with context.database(context.settings())() as s:
        for chunk in exporter.lines(fmt, exporter.records(s, tenant, model_version, include_failed), include_failed):
            output.write(chunk)


@click.command()
@click.option("--batch", "batch_id", type=int, default=None, help="Only the failed jobs of this batch.")
@click.option("--error", "error_code", default=None, help="Only jobs that failed with this code, e.g. too_many_attempts.")
@click.option("--tenant", default="default", show_default=True)
def retry(batch_id, error_code, tenant) -> None:
    """Queue failed jobs again with a fresh attempt count; each keeps its error in its history.

    With a broker the workers take them; without one they are captioned here."""
    from captioner.core import captioner, jobs, queries
    from captioner.core.queue import publisher

    settings = context.settings()
    with context.reported():
        sm = context.database(settings)
        with sm.begin() as s:
            if batch_id is not None:
                queries.batch_view(s, batch_id, tenant)  # another tenant's batch: not found
            retried = queries.retry_failed(s, tenant, batch_id=batch_id, error_code=error_code)
        publisher(settings)(retried)
        click.echo(f"{len(retried)} failed jobs queued again")
        if settings.embedded and retried:
            version = captioner.version(settings)
            jobs.run_embedded(sm, settings, version, batch_id, lambda report: None)
            with sm() as s:
                ids = [d.job_id for d in retried]
                done = sum(1 for j in ids if queries.job_status(s, j) == "done")
            click.echo(f"{done} done, {len(ids) - done} failed")


COMMANDS = [caption, recaption, search, export, retry]
