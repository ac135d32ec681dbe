"""`captioner bench ...`: the benchmarks of bench/, each printing a table and, last, one JSON line."""
import json
from dataclasses import replace
from pathlib import Path

import click

from . import context

IMAGES = "flickr8k/images"


def _photos(images: str | None, count: int | None = None) -> list[Path]:
    folder = context.data_path(images, IMAGES, "--images")
    paths = sorted(folder.glob("*.jpg"))
    if not paths or (count is not None and len(paths) < count):
        raise click.ClickException(f"need {count or 1} .jpg files in {folder}, found {len(paths)}")
    return paths[:count]


@click.group()
def bench() -> None:
    """Throughput and relevance benchmarks that print tables."""


@bench.command("model")
@click.option("--images", type=click.Path(exists=True, file_okay=False), default=None, help=f"[$CAPTIONER_DATA_DIR/{IMAGES}]")
@click.option("--batch-sizes", default=None, help="Comma-separated (default: 1,8,32 on CPU; 1,32,256,1024 on GPU).")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--device", default=None)
@click.option("--beam", type=int, default=3, show_default=True)
@click.option("--runtime", "runtimes", default="torch,onnx", show_default=True,
              help="Comma-separated runtimes to measure side by side. torch runs at $CAPTIONER_PRECISION, "
                   "and where that is bf16 also at fp32, as on a CPU without bf16 units.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Turns each runtime takes per batch size; each row is its fastest.")
def bench_model(images, batch_sizes, checkpoint, device, beam, runtimes, rounds) -> None:
    """Images/s of the encoder, of encoder + beam search, and of whole captions (with the re-ranking
    and quality estimate) per runtime and batch size."""
    from captioner.bench.model import bench_model as run, device_name

    settings = context.settings()
    asked = context.runtimes(runtimes)
    paths = _photos(images)
    captioners = []
    for runtime in asked:
        captioner = context.load_model(settings, checkpoint, device, runtime)
        captioners.append(captioner)
        if runtime == "torch" and captioner.bf16:
            captioners.append(context.load_model(replace(settings, precision="fp32"), checkpoint, device, runtime))
    gpu = captioners[0].device.type == "cuda"
    sizes = [int(s) for s in batch_sizes.split(",")] if batch_sizes else ([1, 32, 256, 1024] if gpu else [1, 8, 32])
    rows = run(captioners, paths, sizes, beam=beam, rounds=rounds)
    first = captioners[0]
    click.echo(f"device: {first.device} ({device_name(first.device)}), beam {beam}, model {first.version}")
    click.echo(f"{'runtime':>8} {'precision':>9} {'batch':>6} {'encoder img/s':>14} {'encoder+beam img/s':>19} "
               f"{'captions/s':>11}")
    for r in rows:
        click.echo(f"{r['runtime']:>8} {r['precision']:>9} {r['batch']:>6} {r['encoder_img_s']:>14.1f} "
                   f"{r['search_img_s']:>19.1f} {r['captions_img_s']:>11.1f}")
    click.echo(json.dumps(rows))


@bench.command("search")
@click.option("--imagenet", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder with images/ and labels.tsv, one photo per class [$CAPTIONER_DATA_DIR/imagenet-samples].")
@click.option("--flickr", type=click.Path(exists=True, file_okay=False), default=None,
              help="Flickr8k folder: images/, Flickr_8k.devImages.txt, Flickr8k.token.txt [$CAPTIONER_DATA_DIR/flickr8k].")
@click.option("--queries", type=click.Path(exists=True, dir_okay=False), default=None,
              help="One query per line [bench/search_queries.txt: 50 written from COCO captions].")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=".cache/bench-search", show_default=True,
              help="Where the captioned corpora are kept (SQLite files), reused by the next run.")
@click.option("--k", type=click.IntRange(1, 100), default=5, show_default=True)
@click.option("--postgres-url", default=None,
              help="Also measure PostgreSQL: the captions are copied into this (migrated) database.")
def bench_search(imagenet, flickr, queries, cache_dir, k, postgres_url) -> None:
    """Search relevance: recall@k of ImageNet class names, precision@k of COCO-written queries."""
    from tqdm import tqdm

    from captioner.bench import search

    imagenet = context.data_path(imagenet, "imagenet-samples", "--imagenet")
    flickr = context.data_path(flickr, "flickr8k", "--flickr")
    with context.reported(), tqdm(unit="img", desc="captioning") as bar:
        result = search.run(context.settings(), imagenet, flickr, Path(queries) if queries else search.QUERIES,
                            Path(cache_dir), k, click.echo, lambda report: bar.update(report.captioned + report.failed),
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
def bench_backfill(bucket, prefix, keys, threads) -> None:
    """Keys/s that POST /v1/batches enqueues from an S3 prefix (database rows and broker doorbells).
    Uploads KEYS tiny objects first when the prefix holds fewer; the jobs it makes are real (use a
    scratch database and broker: a worker there would try to caption the tiny objects)."""
    from captioner.bench import backfill
    from captioner.core.captioner import batch_size

    settings = context.settings()
    with context.reported():
        done = backfill.run(settings, bucket, prefix, keys, threads, click.echo)
    click.echo(f"{done.total} keys enqueued in {done.seconds:.1f}s: {done.total / done.seconds:.0f} keys/s "
               f"({done.new_jobs} new jobs, batch {done.batch_id}, "
               f"{f'broker doorbells in groups of {batch_size(settings)}' if settings.broker_url else 'no broker'})")


@bench.command("metadata")
@click.option("--images", type=click.Path(exists=True, file_okay=False), default=None, help=f"[$CAPTIONER_DATA_DIR/{IMAGES}]")
@click.option("--count", type=click.IntRange(1), default=200, show_default=True, help="Photos to caption.")
def bench_metadata(images, count) -> None:
    """Wall time XMP sidecars add to captioning (`caption --write-metadata sidecar`), in one run."""
    from tqdm import tqdm

    from captioner.bench.metadata import run

    settings = context.settings()
    with context.reported(), tqdm(total=count, unit="img", desc="captioning") as bar:
        row = run(settings, _photos(images, count), progress=bar.update)
    click.echo(f"{row['photos']} photos: captioning {row['caption_s']}s, sidecars {row['metadata_s']}s "
               f"({row['ms_per_file']} ms a file): +{row['overhead_pct']}% wall time")
    click.echo(json.dumps(row))


@bench.command("pipeline")
@click.option("--images", type=click.Path(exists=True, file_okay=False), default=None, help=f"[$CAPTIONER_DATA_DIR/{IMAGES}]")
@click.option("--count", type=int, default=480, show_default=True, help="Photos measured (4 more warm up).")
@click.option("--batch-sizes", default=None, help="Tried for the raw ceiling (default: 4,8,16,32 on CPU; 64,128,256,512 on GPU).")
@click.option("--rounds", type=click.IntRange(min=1), default=2, show_default=True,
              help="Runs of each path after the sweep; each row is its path's best run.")
@click.option("--megapixels", type=click.FloatRange(min=0), default=0, show_default=True,
              help="Re-encode the photos as 4:3 JPEGs of this size first (12: 4000x3000, a phone's); 0 = as they are.")
@context.runtime_option
def bench_pipeline(images, count, batch_sizes, rounds, megapixels, runtime) -> None:
    """Captions/s: the model alone (raw), S3 -> API -> Redis -> batching worker -> PostgreSQL
    (end_to_end) and one task per image (naive), on the same photos; the last line is one JSON object.
    Needs CAPTIONER_DATABASE_URL (a PostgreSQL server; fresh databases are created and dropped) and
    CAPTIONER_BROKER_URL (Redis); starts its own SeaweedFS."""
    import tempfile
    from dataclasses import replace

    from captioner.bench import pipeline
    from captioner.bench.model import device_name
    from captioner.core import captioner

    settings = context.with_runtime(context.settings(), runtime)
    paths = _photos(images, count + pipeline.WARMUP)
    gpu = captioner.batch_size(replace(settings, batch_size=None)) == captioner.GPU_BATCH
    sizes = [int(s) for s in batch_sizes.split(",")] if batch_sizes else ([64, 128, 256, 512] if gpu else [4, 8, 16, 32])
    with tempfile.TemporaryDirectory(prefix="captioner-bench-photos-") as tmp:
        if megapixels:
            click.echo(f"re-encoding {len(paths)} photos at {megapixels:g} MP", err=True)
            paths = pipeline.resized(paths, megapixels, Path(tmp))
        try:
            rows = pipeline.bench(settings, paths, sizes, log=lambda m: click.echo(m, err=True), rounds=rounds)
        except ValueError as e:
            raise click.ClickException(str(e))
    model = context.load_model(settings, None)
    size = f"{megapixels:g} MP photos" if megapixels else "photos as they are"
    click.echo(f"device: {model.device} ({device_name(model.device)}), runtime {model.runtime}, beam {settings.beam}, "
               f"model {model.version}, {size}")
    click.echo(f"{'path':<11} {'captions/s':>10} {'seconds':>8} {'images':>6}  how")
    for r in rows:
        click.echo(f"{r.path:<11} {r.captions_s:>10.2f} {r.seconds:>8.2f} {r.images:>6}  {r.note}")
    click.echo(json.dumps({"runtime": model.runtime, "megapixels": megapixels, **pipeline.summary(rows)}))


@bench.command("scaleout")
@click.option("--images", type=click.Path(exists=True, file_okay=False), default=None, help=f"[$CAPTIONER_DATA_DIR/{IMAGES}]")
@click.option("--count", type=int, default=2000, show_default=True, help="Photos per run (4 more warm up).")
@click.option("--workers", default="1,2,4", show_default=True, help="Worker processes per run.")
@click.option("--side", type=int, default=96, show_default=True,
              help="Photos are re-encoded to this longest side (0 = as they are).")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Default: the tiny random-weight model, so that the shared services are what is measured.")
@click.option("--batch-size", type=int, default=32, show_default=True)
def bench_scaleout(images, count, workers, side, checkpoint, batch_size) -> None:
    """Captions/s with 1, 2, 4 ... worker processes on one broker and one database, with the
    spread of images between them, jobs claimed twice, duplicate rows and database connections.
    Needs CAPTIONER_DATABASE_URL (PostgreSQL) and CAPTIONER_BROKER_URL (Redis); starts its own SeaweedFS."""
    from captioner.bench import scaleout

    paths = _photos(images, count + 4)
    counts = [int(n) for n in workers.split(",")]
    try:
        rows = scaleout.run(context.settings(), paths, counts, side or None, batch_size, checkpoint,
                            log=lambda m: click.echo(m, err=True))
    except ValueError as e:
        raise click.ClickException(str(e))
    click.echo(f"model: {'tiny random weights' if not checkpoint else checkpoint}; photos: "
               f"{f'longest side {side} px' if side else 'as they are'}; batches of {batch_size}")
    for line in scaleout.table(rows):
        click.echo(line)
    click.echo(json.dumps({str(r.workers): round(r.captions_s, 1) for r in rows}))


@bench.command("decode")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), default=None,
              help=f"Photo upscaled to 12 MP [the first photo of $CAPTIONER_DATA_DIR/{IMAGES}].")
@click.option("--repeats", type=int, default=15, show_default=True)
def bench_decode(image, repeats) -> None:
    """Milliseconds from a 12 MP JPEG to the model's input tensor on one core: the serving path
    (draft mode) and a plain full decode + resize; the last line is one JSON object."""
    from captioner.bench import decode

    photo = Path(image) if image else _photos(None)[0]
    data, result = decode.run(context.settings(), photo, repeats)
    w, h = decode.TWELVE_MP
    click.echo(f"{w}x{h} JPEG ({len(data) / 1e6:.1f} MB) -> (3, 224, 224) tensor, 1 thread, median of {repeats}")
    click.echo(f"{'':<28} {'CPU ms':>8} {'wall ms':>8}")
    click.echo(f"{'draft mode (serving path)':<28} {result['draft_cpu']:>8.1f} {result['draft_wall']:>8.1f}")
    click.echo(f"{'full decode + resize':<28} {result['full_cpu']:>8.1f} {result['full_wall']:>8.1f}")
    click.echo(json.dumps({k: round(v, 2) for k, v in result.items()}))


COMMANDS = [bench]
