"""Model commands: train, calibrate, evaluate, the retrieval baseline, and describe (no database)."""
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import click

from captioner.core.settings import PRECISIONS

from . import context

FLICKR_TOKENS, FLICKR_IMAGES = "flickr8k/Flickr8k.token.txt", "flickr8k/images"


@click.command()
@click.option("--captions", type=click.Path(exists=True, dir_okay=False), default=None,
              help=f"Flickr8k token file or COCO-format caption JSON [$CAPTIONER_DATA_DIR/{FLICKR_TOKENS}].")
@click.option("--images", type=click.Path(exists=True, file_okay=False), default=None,
              help=f"[$CAPTIONER_DATA_DIR/{FLICKR_IMAGES}]")
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
    from captioner.model.train import train as run_training

    cfg = _train_config(captions, images, train_split, dev_split, run_dir=run_dir,
                        **{k: v for k, v in overrides.items() if v is not None})
    try:
        best = run_training(cfg, resume=not fresh, log=click.echo)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e))
    if export:
        Path(export).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(best, export)
        click.echo(f"exported {export}")


def _train_config(captions, images, train_split=None, dev_split=None, **given):
    """A TrainConfig for the given files: the data folder's Flickr8k by default, its official
    splits unless others are named."""
    from captioner.model.data import official_splits
    from captioner.model.train import TrainConfig

    captions = context.data_path(captions, FLICKR_TOKENS, "--captions")
    images = context.data_path(images, FLICKR_IMAGES, "--images")
    if train_split is None and dev_split is None and (splits := official_splits(captions)):
        train_split, dev_split = splits
    return TrainConfig(captions=str(captions), images=str(images), train_split=train_split and str(train_split),
                       dev_split=dev_split and str(dev_split), **given)


@click.command()
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
              help="The torch encoder's arithmetic (auto = bf16 where the device has bf16 units).")
@context.runtime_option
def evaluate(images, captions, checkpoint, split, output, beam, batch_size, device, precision, runtime) -> None:
    """Caption every listed image and print COCO metrics; the last line is one JSON object."""
    from captioner.model.evaluate import evaluate_folder

    settings = replace(context.settings(), precision=precision)
    captioner = context.load_model(settings, checkpoint, device, runtime)
    try:
        metrics = evaluate_folder(captioner, Path(images), Path(captions), Path(output),
                                  split=Path(split) if split else None, beam=beam, batch_size=batch_size)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e))
    for key, value in metrics.items():
        click.echo(f"{key:>10}  {value}")
    click.echo(json.dumps(metrics))


@click.command()
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None, help="Default: the shipped model.")
@click.option("--output", type=click.Path(dir_okay=False), required=True,
              help="Where the checkpoint with its estimator goes (a new model version).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Reliability diagram and risk-coverage curve [calibration.png beside --output].")
@click.option("--captions", type=click.Path(exists=True, dir_okay=False), default=None,
              help=f"[$CAPTIONER_DATA_DIR/{FLICKR_TOKENS}]")
@click.option("--images", type=click.Path(exists=True, file_okay=False), default=None,
              help=f"[$CAPTIONER_DATA_DIR/{FLICKR_IMAGES}]")
@click.option("--train-split", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Photos of the nearest-photo bank (the model's training photos).")
@click.option("--dev-split", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Held-out photos the estimator is fitted on, never training photos.")
@click.option("--beam", type=int, default=3, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@context.runtime_option
def calibrate(checkpoint, output, plot, captions, images, train_split, dev_split, beam, batch_size, runtime) -> None:
    """Fit the caption-quality estimator on the dev split and write it into a copy of the checkpoint;
    the last line is the cross-validated figures as JSON."""
    from captioner.model.calibrate import calibrate as fit_estimator
    from captioner.model.inference import DEFAULT_CHECKPOINT

    cfg = _train_config(captions, images, train_split, dev_split)
    settings = replace(context.settings(), precision="fp32")  # the arithmetic production captions in on a CPU
    captioner = context.load_model(settings, checkpoint, runtime=runtime)
    output = Path(output)
    try:
        figures = fit_estimator(captioner, Path(checkpoint or DEFAULT_CHECKPOINT), cfg, output,
                                Path(plot) if plot else output.with_name("calibration.png"),
                                beam=beam, batch_size=batch_size, risk=settings.review_risk)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e))
    click.echo(f"wrote {output}: AUROC {figures['auroc_quality']} (confidence {figures['auroc_confidence']}), "
               f"{figures['unreviewed']:.0%} unreviewed at risk {figures['review_risk']}, "
               f"{figures['wrong_unreviewed']:.1%} of them wrong (cross-validated)")
    click.echo(json.dumps(figures))


@click.command()
@click.option("--captions", type=click.Path(exists=True, dir_okay=False), default=None,
              help=f"[$CAPTIONER_DATA_DIR/{FLICKR_TOKENS}]")
@click.option("--images", type=click.Path(exists=True, file_okay=False), default=None,
              help=f"[$CAPTIONER_DATA_DIR/{FLICKR_IMAGES}]")
@click.option("--k", type=int, default=40, show_default=True, help="Nearest training photos whose captions compete.")
@click.option("--output", type=click.Path(dir_okay=False), default="baseline.json", show_default=True)
def baseline(captions, images, k, output) -> None:
    """Score the retrieval baseline (nearest photos' captions, consensus re-ranked) on the dev split."""
    from captioner.model.retrieval import score_baseline

    click.echo(json.dumps(score_baseline(_train_config(captions, images), k, Path(output))))


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--beam", type=int, default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image.")
@context.runtime_option
def describe(images, checkpoint, beam, as_json, runtime) -> None:
    """Caption local image files, no database needed."""
    from PIL import Image, UnidentifiedImageError

    captioner = context.load_model(context.settings(), checkpoint, runtime=runtime)
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
        if result.quality is not None:
            click.echo(f"  quality:  {result.quality:.3f} (estimated probability that the caption is right)")
        for text, conf in result.candidates:
            click.echo(f"    {conf:.3f}  {text}")
        click.echo("  tags:     " + ", ".join(f"{label} ({p:.2f})" for label, p in result.tags))


COMMANDS = [train, calibrate, evaluate, baseline, describe]
