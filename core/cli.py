"""The `captioner` command: a thin click layer over core/, model/ and the two apps."""
import json
import sys
from pathlib import Path

import click

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"  # ../shared/data beside the checkout


@click.group()
def cli() -> None:
    """Caption photos: train and evaluate the model, run the pipeline, search the results."""


# ---------------------------------------------------------------- model commands

@cli.command()
@click.option("--captions", type=click.Path(exists=True, dir_okay=False), default=str(DATA / "flickr8k" / "Flickr8k.token.txt"),
              show_default=True, help="Flickr8k token file or COCO-format caption JSON.")
@click.option("--images", type=click.Path(exists=True, file_okay=False), default=str(DATA / "flickr8k" / "images"), show_default=True)
@click.option("--train-split", type=click.Path(exists=True, dir_okay=False), default=None,
              help="File of training image names (default for Flickr8k: its official split).")
@click.option("--dev-split", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--run-dir", type=click.Path(file_okay=False), default="runs/default", show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Where encoder features are cached [.cache].")
@click.option("--epochs", type=int, default=None, help="Cross-entropy epochs.")
@click.option("--scst-epochs", type=int, default=None, help="Self-critical (CIDEr) epochs after them.")
@click.option("--max-minutes", type=float, default=None, help="Stop after the epoch that crosses this.")
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--backbone", default=None, help="timm model name, e.g. tf_efficientnet_lite2.")
@click.option("--encoder-weights", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--tuned-stages", type=int, default=None, help="Fine-tune the encoder's last N stages (default 1; 0 = frozen).")
@click.option("--mirror", type=click.FloatRange(0, 1), default=None,
              help="Chance a training caption sees its photo mirrored (default 0.5; 0 = off).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when present).")
@click.option("--seed", type=int, default=None)
@click.option("--fresh", is_flag=True, help="Ignore the run folder's saved state instead of resuming.")
@click.option("--export", type=click.Path(dir_okay=False), default=None, help="Also copy the best checkpoint here.")
def train(captions, images, train_split, dev_split, run_dir, export, fresh, **overrides) -> None:
    """Train the attention decoder on cached encoder features; resumes an interrupted run."""
    import shutil

    import torch

    from model.train import TrainConfig, train as run_training

    if train_split is None and dev_split is None:
        folder = Path(captions).parent
        if (folder / "Flickr_8k.trainImages.txt").exists():
            train_split, dev_split = folder / "Flickr_8k.trainImages.txt", folder / "Flickr_8k.devImages.txt"
    if overrides.get("device") is None:
        overrides["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = TrainConfig(captions=str(captions), images=str(images), run_dir=run_dir,
                      train_split=str(train_split) if train_split else None,
                      dev_split=str(dev_split) if dev_split else None, **given)
    try:
        best = run_training(cfg, resume=not fresh, log=click.echo)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e))
    if export:
        Path(export).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(best, export)
        click.echo(f"exported {export}")


@cli.command()
@click.option("--images", type=click.Path(exists=True, file_okay=False), required=True)
@click.option("--captions", type=click.Path(exists=True, dir_okay=False), required=True,
              help="COCO-format JSON (or a Flickr8k token file) listing the images to score.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None, help="Default: the shipped model.")
@click.option("--split", type=click.Path(exists=True, dir_okay=False), default=None, help="Only the image names in this file.")
@click.option("--output", type=click.Path(dir_okay=False), default="evaluation.json", show_default=True)
@click.option("--beam", type=int, default=3, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", default=None)
def evaluate(images, captions, checkpoint, split, output, beam, batch_size, device) -> None:
    """Caption every listed image and print COCO metrics; the last line is one JSON object."""
    from model import inference
    from model.evaluate import evaluate_folder

    try:
        captioner = inference.load(checkpoint, device=device)
        metrics = evaluate_folder(captioner, Path(images), Path(captions), Path(output),
                                  split=Path(split) if split else None, beam=beam, batch_size=batch_size)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e))
    for key, value in metrics.items():
        click.echo(f"{key:>10}  {value}")
    click.echo(json.dumps(metrics))


@cli.command()
@click.option("--captions", type=click.Path(exists=True, dir_okay=False), default=str(DATA / "flickr8k" / "Flickr8k.token.txt"), show_default=True)
@click.option("--images", type=click.Path(exists=True, file_okay=False), default=str(DATA / "flickr8k" / "images"), show_default=True)
@click.option("--k", type=int, default=40, show_default=True, help="Nearest training photos whose captions compete.")
@click.option("--output", type=click.Path(dir_okay=False), default="baseline.json", show_default=True)
def baseline(captions, images, k, output) -> None:
    """Score the retrieval baseline (nearest photos' captions, consensus re-ranked) on the dev split."""
    from model.evaluate import rounded, write_results
    from model.retrieval import evaluate_baseline
    from model.train import TrainConfig

    folder = Path(captions).parent
    splits = [folder / "Flickr_8k.trainImages.txt", folder / "Flickr_8k.devImages.txt"]
    cfg = TrainConfig(captions=str(captions), images=str(images),
                      **({"train_split": str(splits[0]), "dev_split": str(splits[1])} if splits[0].exists() else {}))
    metrics, predictions = evaluate_baseline(cfg, k)
    metrics = rounded(metrics)
    write_results(Path(output), predictions, metrics)
    click.echo(json.dumps(metrics))


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--beam", type=int, default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image.")
def describe(images, checkpoint, beam, as_json) -> None:
    """Caption local image files, no database needed."""
    from dataclasses import asdict

    from PIL import Image, UnidentifiedImageError

    from model import inference

    captioner = inference.load(checkpoint)
    for path in images:
        try:
            with Image.open(path) as im:
                result = captioner.caption_images([im], beam=beam)[0]
        except (UnidentifiedImageError, OSError) as e:
            click.echo(f"{path}: cannot read image: {e}", err=True)
            continue
        if as_json:
            click.echo(json.dumps({"image": path, **asdict(result)}))
            continue
        click.echo(f"{path}\n  caption:  {result.text}\n  alt text: {result.alt_text}"
                   f"{'  (needs review)' if result.needs_review else ''}")
        for text, conf in result.candidates:
            click.echo(f"    {conf:.3f}  {text}")
        click.echo("  tags:     " + ", ".join(f"{label} ({p:.2f})" for label, p in result.tags))


@cli.group()
def bench() -> None:
    """Throughput benchmarks that print tables."""


@bench.command("model")
@click.option("--images", type=click.Path(exists=True, file_okay=False), default=str(DATA / "flickr8k" / "images"), show_default=True)
@click.option("--batch-sizes", default=None, help="Comma-separated (default: 1,8,32 on CPU; 1,32,256,1024 on GPU).")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--device", default=None)
@click.option("--beam", type=int, default=3, show_default=True)
def bench_model_command(images, batch_sizes, checkpoint, device, beam) -> None:
    """Images/s of the encoder and of encoder + beam search per batch size."""
    from model import inference
    from model.bench import bench_model

    captioner = inference.load(checkpoint, device=device)
    gpu = captioner.device.type == "cuda"
    sizes = [int(s) for s in batch_sizes.split(",")] if batch_sizes else ([1, 32, 256, 1024] if gpu else [1, 8, 32])
    paths = sorted(Path(images).glob("*.jpg"))
    if not paths:
        raise click.ClickException(f"no .jpg files in {images}")
    rows = bench_model(captioner, paths, sizes, beam=beam)
    click.echo(f"device: {captioner.device} ({torch_device_name(captioner.device)}), beam {beam}, model {captioner.version}")
    click.echo(f"{'batch':>6} {'encoder img/s':>14} {'encoder+beam captions/s':>24}")
    for r in rows:
        click.echo(f"{r['batch']:>6} {r['encoder_img_s']:>14.1f} {r['captions_img_s']:>24.1f}")
    click.echo(json.dumps(rows))


def torch_device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{torch.get_num_threads()} CPU threads"


# ---------------------------------------------------------------- pipeline commands


def _open_db(settings):
    """Sessions for the configured database. A SQLite file (the embedded default) is created and
    migrated on first use, so a new user needs no setup step; PostgreSQL waits for `db upgrade`."""
    from core.db import make_engine, make_sessionmaker

    if settings.database_url.startswith("sqlite"):
        from migrations import upgrade
        upgrade(settings.database_url)
    return make_sessionmaker(make_engine(settings.database_url))


def _settings():
    from core.errors import ConfigError
    from core.settings import get_settings

    try:
        return get_settings()
    except ConfigError as e:
        raise click.ClickException(str(e))


@cli.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--limit", type=int, default=None, help="Caption at most this many images.")
@click.option("--queue", type=click.Choice(["interactive", "backfill"]), default="backfill", show_default=True,
              help="Broker queue (distributed mode only).")
@click.option("--wait/--no-wait", default=False, help="Distributed mode: follow the batch until it is done.")
@click.option("--samples", type=int, default=5, show_default=True, help="Captions to show at the end.")
def caption(paths, limit, queue, wait, samples) -> None:
    """Caption image files, folders and s3://bucket/prefix locations.

    With no broker configured (CAPTIONER_BROKER_URL unset) this runs the whole pipeline in this
    process on the SQLite database, skipping images this model already captioned, so a second run
    is quick and an interrupted run resumes. With a broker it submits the images for the workers
    (uploading local files to CAPTIONER_STORAGE first), prints the batch id and, with --wait,
    follows the batch to the end.
    """
    import time

    from tqdm import tqdm

    from core import captioner, jobs, queries, storage
    from core.errors import CaptioningError
    from core.tables import Image

    settings = _settings()
    try:
        sm = _open_db(settings)
        images = list(jobs.expand_paths(paths, limit, settings.s3_prefix_limit))
        if not images:
            raise click.ClickException(f"no images found in {' '.join(paths)}")
        version = captioner.version(settings)
        started = time.perf_counter()
        if settings.embedded:
            batch_id, submitted = jobs.submit_images(sm, images, version, queue, lambda _: None,
                                                     batch_source=" ".join(paths))
        else:
            from core.queue import create_celery, publish

            # workers elsewhere cannot read this machine's files: put them in the shared store
            images = [jobs.NewImage(storage.store(settings.storage, storage.read(i.uri, settings.max_upload_bytes))[0],
                                    i.fingerprint, i.sha256, i.size) if i.uri.startswith("file://") else i
                      for i in images]
            app = create_celery(settings)
            batch_id, submitted = jobs.submit_images(sm, images, version, queue, lambda j: publish(app, j),
                                                     batch_source=" ".join(paths))
            click.echo(f"batch {batch_id}: {len({x.image_id for x in submitted})} images submitted to the workers")
            if not wait:
                return
        unique = {x.job_id: x for x in submitted}.values()
        already = sum(1 for x in unique if x.status == "done")
        todo = sum(1 for x in unique if x.status in ("queued", "processing"))
        with tqdm(total=todo, unit="img", desc="captioning", disable=todo == 0) as bar:
            if settings.embedded:
                jobs.run_embedded(sm, settings, version, batch_id,
                                  lambda report: bar.update(report.captioned + report.failed))
            else:
                _follow(sm, batch_id, todo, bar)
        elapsed = time.perf_counter() - started
        with sm() as s:
            view = queries.batch_view(s, batch_id)
            failures = queries.failures_by_code(s, batch_id)
            shown = list(s.execute(queries.results_query(version).where(
                Image.id.in_([x.image_id for x in submitted[:samples]]))).all())
    except CaptioningError as e:
        raise click.ClickException(f"{e.code}: {e.message}")
    counts = view["counts"]
    captioned = counts["done"] - already
    rate = f", {captioned / elapsed:.1f} captions/s" if captioned else ""
    click.echo(f"{view['total']} images: {counts['done']} done ({captioned} captioned now, {already} already), "
               f"{counts['failed']} failed, {counts['queued'] + counts['processing']} left; "
               f"{elapsed:.1f}s{rate}; model {version}")
    for code, n in sorted(failures.items()):
        click.echo(f"  failed: {n} x {code}")
    for image, cap in shown:
        click.echo(f"  {Path(image.uri).name}: {cap.text}")
    click.echo(f"database: {settings.database_url}  (try: captioner search WORDS, captioner export)")


def _follow(sm, batch_id: int, todo: int, bar) -> None:
    """Poll a batch's counts until none is queued or processing (Ctrl-C stops watching, not the work)."""
    import time

    from core import queries

    while True:
        with sm() as s:
            counts = queries.batch_view(s, batch_id)["counts"]
        left = counts["queued"] + counts["processing"]
        bar.update(max(todo - left - bar.n, 0))
        if left == 0:
            return
        time.sleep(1)


@cli.command()
@click.argument("words", nargs=-1, required=True)
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per match.")
def search(words, limit, as_json) -> None:
    """Captioned images whose caption contains every one of WORDS."""
    from core import search as search_index

    settings = _settings()
    with _open_db(settings)() as s:
        rows = search_index.query_index(s, " ".join(words), limit)
    for row in rows:
        click.echo(json.dumps(row) if as_json else f"{row['id']:>7}  {row['confidence']:.2f}  {row['caption']}  {row['source']}")
    if not rows and not as_json:
        click.echo("no matches", err=True)


EXPORT_FIELDS = ["id", "source", "sha256", "width", "height", "caption", "alt_text", "confidence", "needs_review",
                 "candidates", "tags", "model_version", "captioned_at"]


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option("--output", type=click.File("w", encoding="utf-8"), default="-", show_default=True)
@click.option("--model-version", default=None, help="Only captions of this model version.")
def export(fmt, output, model_version) -> None:
    """Write every caption with its image, alt text, candidates and tags."""
    import csv

    from core import queries

    settings = _settings()
    writer = csv.DictWriter(output, EXPORT_FIELDS) if fmt == "csv" else None
    if writer:
        writer.writeheader()
    with _open_db(settings)() as s:
        for image, cap in s.execute(queries.results_query(model_version).execution_options(yield_per=1000)):
            row = {"id": image.id, "source": image.uri, "sha256": image.sha256, "width": image.width,
                   "height": image.height, "caption": cap.text, "alt_text": cap.alt_text,
                   "confidence": cap.confidence, "needs_review": cap.needs_review,
                   "candidates": [{"text": t, "score": p} for t, p in cap.candidates],
                   "tags": [{"label": t, "score": p} for t, p in cap.tags],
                   "model_version": cap.model_version, "captioned_at": cap.created_at.isoformat()}
            if writer:
                # a spreadsheet cell holds one value: lists become JSON text
                writer.writerow({**row, "candidates": json.dumps(row["candidates"]), "tags": json.dumps(row["tags"])})
            else:
                output.write(json.dumps(row) + "\n")


@cli.command()
@click.option("--queues", default="interactive,backfill", show_default=True,
              help="Queues to consume; run separate workers per queue to isolate them fully.")
@click.option("--concurrency", type=int, default=1, show_default=True,
              help="Pool processes. One per GPU; on a CPU one process already uses every core through torch.")
@click.option("--beat/--no-beat", default=True, show_default=True,
              help="Run the periodic sweep here too (idempotent, so several are harmless).")
@click.option("--loglevel", default="info", show_default=True)
def worker(queues, concurrency, beat, loglevel) -> None:
    """Start a Celery worker that captions batches (needs CAPTIONER_BROKER_URL)."""
    from core import captioner
    from core.errors import CaptioningError

    settings = _settings()
    if settings.embedded:
        raise click.ClickException("CAPTIONER_BROKER_URL is not set; without a broker use `captioner caption PATH`")
    try:
        captioner.version(settings)  # a missing checkpoint stops here, not in every pool child
    except CaptioningError as e:
        raise click.ClickException(e.message)
    from worker.tasks import app

    argv = ["worker", "--queues", queues, "--concurrency", str(concurrency), "--pool", "prefork",
            "--loglevel", loglevel, "--task-events"]
    if beat:
        # the in-memory scheduler: no schedule file for two workers on one host to fight over
        argv += ["--beat", "--scheduler", "celery.beat:Scheduler"]
    app.worker_main(argv)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="gunicorn worker processes.")
@click.option("--threads", type=int, default=8, show_default=True, help="Threads per process (uploads wait on I/O).")
def serve(host, port, workers, threads) -> None:
    """Start the HTTP API under gunicorn."""
    import os

    _settings()  # fail here, with the message, rather than inside each gunicorn worker
    gunicorn = Path(sys.executable).with_name("gunicorn")
    os.execv(str(gunicorn), [str(gunicorn), "--bind", f"{host}:{port}", "--workers", str(workers),
                             "--threads", str(threads), "--access-logfile", "-", "api:create_app()"])


@cli.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision) -> None:
    """Apply migrations to CAPTIONER_DATABASE_URL (PostgreSQL or SQLite)."""
    from migrations import upgrade

    settings = _settings()
    upgrade(settings.database_url, revision)
    click.echo(f"database at {revision}: {settings.database_url}")


if __name__ == "__main__":
    sys.exit(cli())
