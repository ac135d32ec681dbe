"""The `captioner` command: a thin click layer over core/, model/ and the two apps."""
import json
import sys
from pathlib import Path

import click

from captioner.core.settings import PRECISIONS

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

    from captioner.model.train import TrainConfig, train as run_training

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
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default="auto", show_default=True,
              help="The encoder's arithmetic (auto = bf16 where the device has bf16 units).")
def evaluate(images, captions, checkpoint, split, output, beam, batch_size, device, precision) -> None:
    """Caption every listed image and print COCO metrics; the last line is one JSON object."""
    from captioner.model import inference
    from captioner.model.evaluate import evaluate_folder

    try:
        captioner = inference.load(checkpoint, device=device, bf16=PRECISIONS[precision])
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
    from captioner.model.evaluate import rounded, write_results
    from captioner.model.retrieval import evaluate_baseline
    from captioner.model.train import TrainConfig

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

    from captioner.model import inference

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
    from captioner.model import inference
    from captioner.bench.model import bench_model

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


@bench.command("search")
@click.option("--imagenet", type=click.Path(exists=True, file_okay=False), default=str(DATA / "imagenet-samples"),
              show_default=True, help="Folder with images/ and labels.tsv (one photo per class).")
@click.option("--flickr", type=click.Path(exists=True, file_okay=False), default=str(DATA / "flickr8k"),
              show_default=True, help="Flickr8k folder: images/, Flickr_8k.devImages.txt, Flickr8k.token.txt.")
@click.option("--queries", type=click.Path(exists=True, dir_okay=False), default=None,
              help="One query per line [core/search_queries.txt: 50 written from COCO captions].")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=".cache/bench-search", show_default=True,
              help="Where the captioned corpora are kept (SQLite files), reused by the next run.")
@click.option("--k", type=click.IntRange(1, 100), default=5, show_default=True)
@click.option("--postgres-url", default=None,
              help="Also measure PostgreSQL: the captions are copied into this (migrated) database.")
def bench_search_command(imagenet, flickr, queries, cache_dir, k, postgres_url) -> None:
    """Search relevance: recall@k of ImageNet class names, precision@k of COCO-written queries."""
    from tqdm import tqdm

    from captioner.bench import search as bench_search

    with tqdm(unit="img", desc="captioning") as bar:
        result = bench_search.run(_settings(), Path(imagenet), Path(flickr),
                                  Path(queries) if queries else bench_search.QUERIES, Path(cache_dir), k,
                                  click.echo, lambda report: bar.update(report.captioned + report.failed),
                                  postgres_url)
    backends = [b for b in ("sqlite", "postgresql") if b in result]
    click.echo(f"\n{'measure':<58}" + "".join(f" {b:>10}" for b in backends))

    def row(label: str, part: str, key: str, fmt: str) -> None:
        click.echo(f"{label:<58}" + "".join(f" {result[b][part][key]:>10{fmt}}" for b in backends))

    names, coco = "imagenet_class_names", "coco_queries_on_flickr8k_dev"
    row(f"ImageNet class names ({result['sqlite'][names]['queries']}): recall@1", names, "recall@1", ".3f")
    row(f"ImageNet class names: recall@{k}", names, f"recall@{k}", ".3f")
    row(f"COCO queries ({result['sqlite'][coco]['queries']}) on Flickr8k dev: precision@{k}", coco,
        f"precision@{k}", ".3f")
    row(f"COCO queries with a relevant photo in the top {k}", coco, f"found_relevant_in_top{k}", "")
    row("COCO queries with any relevant photo (human captions)", coco, "answerable", "")
    click.echo(json.dumps(result))


@bench.command("backfill")
@click.option("--bucket", required=True, help="A scratch bucket: the keys are created there if missing.")
@click.option("--prefix", default="bench-backfill/", show_default=True)
@click.option("--keys", type=int, default=100_000, show_default=True)
@click.option("--threads", type=int, default=32, show_default=True, help="Upload threads for missing keys.")
def bench_backfill_command(bucket, prefix, keys, threads) -> None:
    """Keys/s that POST /v1/batches enqueues from an S3 prefix (database rows and broker doorbells).
    Uploads KEYS tiny objects first when the prefix holds fewer; the jobs it makes are real (use a
    scratch database and broker: a worker there would try to caption the tiny objects)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from captioner.core import backfill, captioner, storage
    from captioner.core.errors import CaptioningError
    from captioner.core.queue import create_celery, publish

    settings = _settings()
    client = storage.s3_client()
    have = sum(len(page) for page in storage.list_pages(bucket, prefix))
    if have < keys:
        started = time.perf_counter()
        names = [f"{prefix}{n:07d}.jpg" for n in range(keys)]
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=k.encode()), names))
        click.echo(f"uploaded {keys} objects in {time.perf_counter() - started:.1f}s")
    app = create_celery(settings) if settings.broker_url else None
    group = captioner.batch_size(settings)
    sm = _open_db(settings)
    try:
        done = backfill.enqueue_prefix(sm, bucket, prefix, captioner.version(settings), "backfill",
                                       (lambda j: publish(app, j, group)) if app else (lambda _: None), keys)
    except CaptioningError as e:
        raise click.ClickException(f"{e.code}: {e.message}")
    click.echo(f"{done.total} keys enqueued in {done.seconds:.1f}s: {done.total / done.seconds:.0f} keys/s "
               f"({done.new_jobs} new jobs, batch {done.batch_id}, "
               f"{'broker ' + 'doorbells in groups of ' + str(group) if app else 'no broker'})")


@bench.command("pipeline")
@click.option("--images", type=click.Path(exists=True, file_okay=False), default=str(DATA / "flickr8k" / "images"), show_default=True)
@click.option("--count", type=int, default=480, show_default=True, help="Photos measured (4 more warm up).")
@click.option("--batch-sizes", default=None, help="Tried for the raw ceiling (default: 4,8,16,32 on CPU; 64,128,256,512 on GPU).")
@click.option("--rounds", type=click.IntRange(min=1), default=2, show_default=True,
              help="Runs of each path after the sweep; each row is its path's best run.")
def bench_pipeline_command(images, count, batch_sizes, rounds) -> None:
    """Captions/s: the model alone (raw), S3 -> API -> Redis -> batching worker -> PostgreSQL
    (end_to_end) and one task per image (naive), on the same photos; the last line is one JSON object.
    Needs CAPTIONER_DATABASE_URL (a PostgreSQL server; fresh databases are created and dropped) and
    CAPTIONER_BROKER_URL (Redis); starts its own SeaweedFS."""
    from dataclasses import replace

    from captioner.bench import pipeline as bench_pipeline
    from captioner.core import captioner

    settings = _settings()
    paths = sorted(Path(images).glob("*.jpg"))[:count + bench_pipeline.WARMUP]
    if len(paths) < count + bench_pipeline.WARMUP:
        raise click.ClickException(f"need {count + bench_pipeline.WARMUP} .jpg files in {images}, found {len(paths)}")
    gpu = captioner.batch_size(replace(settings, batch_size=None)) == captioner.GPU_BATCH
    sizes = [int(s) for s in batch_sizes.split(",")] if batch_sizes else ([64, 128, 256, 512] if gpu else [4, 8, 16, 32])
    try:
        rows = bench_pipeline.bench(settings, paths, sizes, log=lambda m: click.echo(m, err=True), rounds=rounds)
    except ValueError as e:
        raise click.ClickException(str(e))
    model = captioner.get(settings)
    click.echo(f"device: {model.device} ({torch_device_name(model.device)}), beam {settings.beam}, model {model.version}")
    click.echo(f"{'path':<11} {'captions/s':>10} {'seconds':>8} {'images':>6}  how")
    for r in rows:
        click.echo(f"{r.path:<11} {r.captions_s:>10.2f} {r.seconds:>8.2f} {r.images:>6}  {r.note}")
    click.echo(json.dumps(bench_pipeline.summary(rows)))


@bench.command("scaleout")
@click.option("--images", type=click.Path(exists=True, file_okay=False), default=str(DATA / "flickr8k" / "images"), show_default=True)
@click.option("--count", type=int, default=2000, show_default=True, help="Photos per run (4 more warm up).")
@click.option("--workers", default="1,2,4", show_default=True, help="Worker processes per run.")
@click.option("--side", type=int, default=96, show_default=True,
              help="Photos are re-encoded to this longest side (0 = as they are).")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Default: the tiny random-weight model, so that the shared services are what is measured.")
@click.option("--batch-size", type=int, default=32, show_default=True)
def bench_scaleout_command(images, count, workers, side, checkpoint, batch_size) -> None:
    """Captions/s with 1, 2, 4 ... worker processes on one broker and one database, with the
    spread of images between them, jobs claimed twice, duplicate rows and database connections.
    Needs CAPTIONER_DATABASE_URL (PostgreSQL) and CAPTIONER_BROKER_URL (Redis); starts its own SeaweedFS."""
    import tempfile
    from dataclasses import replace

    from captioner.bench import scaleout as bench_scaleout
    from captioner.model.train import export_tiny_checkpoint

    paths = sorted(Path(images).glob("*.jpg"))[:count + 4]
    if len(paths) < count + 4:
        raise click.ClickException(f"need {count + 4} .jpg files in {images}, found {len(paths)}")
    counts = [int(n) for n in workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="captioner-tiny-") as tmp:
        model_path = checkpoint or str(export_tiny_checkpoint(Path(tmp)))
        settings = replace(_settings(), model_path=model_path)
        try:
            rows = bench_scaleout.bench(settings, paths, counts, side or None, batch_size,
                                        log=lambda m: click.echo(m, err=True))
        except ValueError as e:
            raise click.ClickException(str(e))
    click.echo(f"model: {'tiny random weights' if not checkpoint else checkpoint}; photos: "
               f"{f'longest side {side} px' if side else 'as they are'}; batches of {batch_size}")
    for line in bench_scaleout.table(rows):
        click.echo(line)
    click.echo(json.dumps({str(r.workers): round(r.captions_s, 1) for r in rows}))


@bench.command("decode")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Photo upscaled to 12 MP (default: the first shared Flickr8k photo).")
@click.option("--repeats", type=int, default=15, show_default=True)
def bench_decode_command(image, repeats) -> None:
    """Milliseconds from a 12 MP JPEG to the model's input tensor on one core: the serving path
    (draft mode) and a plain full decode + resize; the last line is one JSON object."""
    import tempfile

    from captioner.bench import decode as bench_decode

    photo = Path(image) if image else next(iter(sorted((DATA / "flickr8k" / "images").glob("*.jpg"))), None)
    if photo is None:
        raise click.ClickException("no photo: pass --image")
    with tempfile.TemporaryDirectory(prefix="captioner-decode-") as tmp:
        data = bench_decode.twelve_megapixel_jpeg(photo, Path(tmp))
    result = bench_decode.bench(_settings(), data, repeats)
    w, h = bench_decode.TWELVE_MP
    click.echo(f"{w}x{h} JPEG ({len(data) / 1e6:.1f} MB) -> (3, 224, 224) tensor, 1 thread, median of {repeats}")
    click.echo(f"{'':<28} {'CPU ms':>8} {'wall ms':>8}")
    click.echo(f"{'draft mode (serving path)':<28} {result['draft_cpu']:>8.1f} {result['draft_wall']:>8.1f}")
    click.echo(f"{'full decode + resize':<28} {result['full_cpu']:>8.1f} {result['full_wall']:>8.1f}")
    click.echo(json.dumps({k: round(v, 2) for k, v in result.items()}))


def torch_device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{torch.get_num_threads()} CPU threads"


# ---------------------------------------------------------------- pipeline commands


def _open_db(settings):
    """Sessions for the configured database. A SQLite file (the embedded default) is created and
    migrated on first use, so a new user needs no setup step; PostgreSQL waits for `db upgrade`."""
    from captioner.core.db import make_engine, make_sessionmaker

    if settings.database_url.startswith("sqlite"):
        from captioner.migrations import upgrade
        upgrade(settings.database_url)
    return make_sessionmaker(make_engine(settings.database_url))


def _settings():
    from captioner.core.errors import ConfigError
    from captioner.core.settings import get_settings

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

    from captioner.core import captioner, jobs, queries, storage
    from captioner.core.errors import CaptioningError
    from captioner.core.tables import Image

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
            from captioner.core.queue import create_celery, publish

            # workers elsewhere cannot read this machine's files: put them in the shared store
            images = [jobs.NewImage(storage.store(settings.storage, storage.read(i.uri, settings.max_upload_bytes))[0],
                                    i.fingerprint, i.sha256, i.size) if i.uri.startswith("file://") else i
                      for i in images]
            app = create_celery(settings)
            group = captioner.batch_size(settings)
            batch_id, submitted = jobs.submit_images(sm, images, version, queue, lambda j: publish(app, j, group),
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
    for image, cap, _ in shown:
        click.echo(f"  {Path(image.uri).name}: {cap.text}")
    click.echo(f"database: {settings.database_url}  (try: captioner search WORDS, captioner export)")


@cli.command()
@click.option("--from-version", default=None,
              help="Only images captioned by this model version (default: by any version but the current one).")
@click.option("--all", "every_image", is_flag=True,
              help="Every image without a job for the current model, captioned before or not.")
def recaption(from_version, every_image) -> None:
    """Re-queue images captioned by an older model as backfill jobs for the current model.

    The new caption is stored beside the old one and served from then on; alt text a person
    approved, edited or marked decorative stays. With a broker the workers do the work (the batch
    id is printed: follow it with GET /v1/batches/<id>); without one it runs here.
    """
    from tqdm import tqdm

    from captioner.core import backfill, captioner, jobs, queries
    from captioner.core.errors import CaptioningError

    settings = _settings()
    try:
        sm = _open_db(settings)
        version = captioner.version(settings)
        if settings.embedded:
            done = backfill.recaption(sm, version, lambda _: None, from_version, every_image)
        else:
            from captioner.core.queue import create_celery, publish

            app, group = create_celery(settings), captioner.batch_size(settings)
            done = backfill.recaption(sm, version, lambda j: publish(app, j, group), from_version, every_image)
        if done.batch_id is None:
            click.echo(f"nothing to re-caption: every image has a job for model {version}")
            return
        click.echo(f"batch {done.batch_id}: {done.total} images queued for model {version}")
        if settings.embedded:
            with tqdm(total=done.new_jobs, unit="img", desc="re-captioning") as bar:
                jobs.run_embedded(sm, settings, version, done.batch_id,
                                  lambda report: bar.update(report.captioned + report.failed))
            with sm() as s:
                counts = queries.batch_view(s, done.batch_id)["counts"]
            click.echo(f"{counts['done']} done, {counts['failed']} failed")
    except CaptioningError as e:
        raise click.ClickException(f"{e.code}: {e.message}")


def _follow(sm, batch_id: int, todo: int, bar) -> None:
    """Poll a batch's counts until none is queued or processing (Ctrl-C stops watching, not the work)."""
    import time

    from captioner.core import queries

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
    from captioner.core.errors import CaptioningError

    settings = _settings()
    try:
        with _open_db(settings)() as s:
            rows = search_index.query_index(s, " ".join(words), limit, offset, tenant)
    except CaptioningError as e:
        raise click.ClickException(f"{e.code}: {e.message}")
    for row in rows:
        click.echo(json.dumps(row) if as_json else
                   f"{row['id']:>7}  {row['score']:.3f}  {row['caption']}  {row['source']}")
    if not rows and not as_json:
        click.echo("no matches", err=True)


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option("--output", type=click.File("w", encoding="utf-8"), default="-", show_default=True)
@click.option("--model-version", default=None, help="Only captions of this model version.")
@click.option("--tenant", default="default", show_default=True)
def export(fmt, output, model_version, tenant) -> None:
    """Write every caption with its image key, alt text, state, candidates and tags (for CMS imports)."""
    from captioner.core import export as exporter

    settings = _settings()
    with _open_db(settings)() as s:
        for chunk in exporter.lines(fmt, exporter.records(s, tenant, model_version)):
            output.write(chunk)


@cli.command()
@click.option("--queues", default="interactive,backfill", show_default=True,
              help="Queues to consume; run separate workers per queue to isolate them fully.")
@click.option("--concurrency", type=int, default=1, show_default=True,
              help="Pool processes. One per GPU; on a CPU one process already uses every core through torch.")
@click.option("--beat/--no-beat", default=True, show_default=True,
              help="Run the periodic sweep here too (idempotent, so several are harmless).")
@click.option("--loglevel", default="info", show_default=True)
@click.option("--hostname", default=None, help="Celery node name, e.g. gpu1@%h: unique per worker on one host.")
def worker(queues, concurrency, beat, loglevel, hostname) -> None:
    """Start a Celery worker that captions batches (needs CAPTIONER_BROKER_URL)."""
    from captioner.core import captioner
    from captioner.core.errors import CaptioningError

    settings = _settings()
    if settings.embedded:
        raise click.ClickException("CAPTIONER_BROKER_URL is not set; without a broker use `captioner caption PATH`")
    try:
        captioner.version(settings)  # a missing checkpoint stops here, not in every pool child
    except CaptioningError as e:
        raise click.ClickException(e.message)
    if settings.worker_metrics_port:
        import os
        import tempfile

        # prometheus_client's multiprocess mode, chosen when it is imported: the prefork children
        # write their samples to files here and the main process serves their sum
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="captioner-metrics-"))
    from captioner.worker.tasks import app

    app.conf.worker_concurrency = concurrency  # also read by the pool processes (their torch threads)
    argv = ["worker", "--queues", queues, "--concurrency", str(concurrency), "--pool", "prefork",
            "--loglevel", loglevel, "--task-events"]
    if hostname:
        argv += ["--hostname", hostname]
    if beat:
        # the in-memory scheduler: no schedule file for two workers on one host to fight over
        argv += ["--beat", "--scheduler", "celery.beat:Scheduler"]
    app.worker_main(argv)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=5555, show_default=True)
def flower(host, port) -> None:
    """Start Flower, the Celery monitor, on the broker (needs CAPTIONER_BROKER_URL).

    Basic auth comes from CAPTIONER_FLOWER_BASIC_AUTH=user:password, required unless Flower listens
    on 127.0.0.1 only: Flower's pages and API can revoke tasks and shut workers down."""
    import os

    from captioner.core.queue import create_celery

    settings = _settings()
    if settings.embedded:
        raise click.ClickException("CAPTIONER_BROKER_URL is not set: Flower watches a broker's workers")
    if settings.flower_basic_auth is None and host != "127.0.0.1":
        raise click.ClickException(f"set CAPTIONER_FLOWER_BASIC_AUTH=user:password to listen on {host}; "
                                   "without it Flower listens on 127.0.0.1 only")
    if settings.flower_basic_auth:
        # Flower's own variable rather than --basic-auth: a password in argv shows in `ps`
        os.environ["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth
    create_celery(settings).start(["flower", f"--address={host}", f"--port={port}"])


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="gunicorn worker processes.")
@click.option("--threads", type=int, default=8, show_default=True, help="Threads per process (uploads wait on I/O).")
def serve(host, port, workers, threads) -> None:
    """Start the HTTP API under gunicorn."""
    import os
    import tempfile

    _settings()  # fail here, with the message, rather than inside each gunicorn worker
    # prometheus_client's multiprocess mode: each gunicorn worker counts in files here and
    # /metrics sums them (a fresh folder: counters restart with the server, as Prometheus expects)
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="captioner-api-metrics-"))
    gunicorn = Path(sys.executable).with_name("gunicorn")
    os.execv(str(gunicorn), [str(gunicorn), "--bind", f"{host}:{port}", "--workers", str(workers),
                             "--threads", str(threads), "--access-logfile", "-", "captioner.api:create_app()"])


@cli.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision) -> None:
    """Apply migrations to CAPTIONER_DATABASE_URL (PostgreSQL or SQLite)."""
    from captioner.migrations import upgrade

    settings = _settings()
    upgrade(settings.database_url, revision)
    click.echo(f"database at {revision}: {settings.database_url}")


# ---------------------------------------------------------------- keys and tenants


@cli.group()
def keys() -> None:
    """API keys: the API answers 401 without one (unless CAPTIONER_AUTH=off)."""


@keys.command("create")
@click.option("--tenant", required=True, help="Whose images the key reads and writes.")
@click.option("--scope", type=click.Choice(["read", "write", "admin"]), default="write", show_default=True,
              help="read: GET routes; write: also submit; admin: everything (each includes the ones before).")
@click.option("--name", default="", help="A note to tell keys apart in `keys list`.")
def keys_create(tenant, scope, name) -> None:
    """Create a key; it is printed once, as the last word of the last line, and only its hash is kept."""
    from captioner.core import auth
    from captioner.core.errors import CaptioningError

    settings = _settings()
    try:
        with _open_db(settings).begin() as s:
            row, key = auth.create_key(s, tenant, scope, name)
            key_id, scopes = row.id, row.scopes
    except CaptioningError as e:
        raise click.ClickException(e.message)
    click.echo(f"key {key_id} for tenant {tenant} (scopes: {scopes}); it is shown only now, store it:", err=True)
    click.echo(key)


@keys.command("revoke")
@click.argument("key_id", type=int)
def keys_revoke(key_id) -> None:
    """Revoke key KEY_ID: requests with it get 401 from now on."""
    from captioner.core import auth
    from captioner.core.errors import CaptioningError

    try:
        with _open_db(_settings()).begin() as s:
            row = auth.revoke_key(s, key_id)
            click.echo(f"key {row.id} ({row.tenant}, {row.prefix}) revoked at {row.revoked_at.isoformat()}")
    except CaptioningError as e:
        raise click.ClickException(e.message)


@keys.command("list")
@click.option("--tenant", default=None)
def keys_list(tenant) -> None:
    """Keys with their tenant, public prefix, scopes and last use (never the keys themselves)."""
    from captioner.core import auth

    with _open_db(_settings())() as s:
        rows = auth.list_keys(s, tenant)
    for r in rows:
        state = f"revoked {r.revoked_at.isoformat()}" if r.revoked_at else "active"
        used = r.last_used_at.isoformat() if r.last_used_at else "never used"
        click.echo(f"{r.id:>5}  {r.tenant}  cap_{r.prefix}_...  {r.scopes}  {state}  {used}  {r.name}")


@cli.group()
def tenants() -> None:
    """Tenants' S3 allow-lists: a tenant may submit images only from the locations allowed here."""


@tenants.command("allow-bucket")
@click.argument("tenant")
@click.argument("location")
def tenants_allow_bucket(tenant, location) -> None:
    """Let TENANT submit objects under LOCATION (s3://bucket or s3://bucket/prefix; the prefix is
    matched as a string, so end it with / to mean a folder)."""
    from captioner.core import auth, storage
    from captioner.core.errors import CaptioningError

    try:
        bucket, prefix = storage.split_s3(location)
        with _open_db(_settings()).begin() as s:
            auth.allow_bucket(s, tenant, bucket, prefix)
    except CaptioningError as e:
        raise click.ClickException(e.message)
    click.echo(f"tenant {tenant} may read s3://{bucket}/{prefix}")


@tenants.command("deny-bucket")
@click.argument("tenant")
@click.argument("location")
def tenants_deny_bucket(tenant, location) -> None:
    """Remove an allowance made with allow-bucket (images already submitted stay)."""
    from captioner.core import auth, storage
    from captioner.core.errors import CaptioningError

    try:
        bucket, prefix = storage.split_s3(location)
        with _open_db(_settings()).begin() as s:
            auth.deny_bucket(s, tenant, bucket, prefix)
    except CaptioningError as e:
        raise click.ClickException(e.message)
    click.echo(f"tenant {tenant} may no longer read s3://{bucket}/{prefix}")


@tenants.command("list")
def tenants_list() -> None:
    """Every tenant's allowed S3 locations."""
    from captioner.core import auth

    with _open_db(_settings())() as s:
        for row in auth.allowed_buckets(s):
            click.echo(f"{row.tenant}  s3://{row.bucket}/{row.prefix}")


if __name__ == "__main__":
    sys.exit(cli())
