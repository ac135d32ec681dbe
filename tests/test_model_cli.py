"""`captioner train`, `evaluate` and `describe` through click's CliRunner on a tiny synthetic set."""
import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageDraw

from captioner.cli import cli

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}
SHAPES = ["square", "circle"]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """Twelve drawn photos of coloured shapes, five captions each, in Flickr8k's token format."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "images").mkdir()
    lines = []
    for i in range(12):
        colour, shape = list(COLOURS)[i % 3], SHAPES[(i // 3) % 2]
        im = Image.new("RGB", (160 + 8 * i, 120), (245, 245, 240))
        draw = ImageDraw.Draw(im)
        box = (30 + i, 20, 110 + i, 100)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
        name = f"photo{i:02d}.jpg"
        im.save(root / "images" / name, quality=90)
        for k, text in enumerate([f"a {colour} {shape}", f"a {colour} {shape} on white",
                                  f"the {colour} {shape}", f"one {colour} {shape}", f"a {shape} that is {colour}"]):
            lines.append(f"{name}#{k}\t{text} .")
    (root / "tokens.txt").write_text("\n".join(lines) + "\n")
    coco = {"images": [{"id": i, "file_name": f"photo{i:02d}.jpg"} for i in range(12)],
            "annotations": [{"id": n, "image_id": int(line[5:7]), "caption": line.split("\t")[1]}
                            for n, line in enumerate(lines)]}
    (root / "captions.json").write_text(json.dumps(coco))
    return root


@pytest.mark.integration  # the real encoder's training runs: 10 s
def test_train_writes_a_resumable_run_and_a_loadable_checkpoint(tiny_set, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--captions", str(tiny_set / "tokens.txt"), "--images", str(tiny_set / "images"),
            "--run-dir", str(run), "--epochs", "2", "--scst-epochs", "1", "--batch-size", "8", "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache"), "--export", str(tmp_path / "exported.pt")]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["phase"] for h in history] == ["cross-entropy", "cross-entropy", "self-critical"]
    assert (run / "training.png").stat().st_size > 1000
    ckpt = torch.load(tmp_path / "exported.pt", weights_only=True)
    assert "red" in ckpt["vocab"] and ckpt["recipe"]["epochs"] == 2
    # a second run finds the finished state and trains no more
    again = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert "resuming after epoch 3" in again.output
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.integration  # three training runs
def test_training_is_deterministic_for_a_seed(tiny_set, tmp_path):
    def run(folder: str, seed: str) -> dict:
        args = ["train", "--captions", str(tiny_set / "tokens.txt"), "--images", str(tiny_set / "images"),
                "--run-dir", str(tmp_path / folder), "--epochs", "1", "--scst-epochs", "0", "--batch-size", "16",
                "--seed", seed, "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return torch.load(tmp_path / folder / "best.pt", weights_only=True)["model"]

    first, again, other = run("a", "7"), run("b", "7"), run("c", "8")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.integration  # a training run that backpropagates through the encoder
def test_fine_tuning_the_top_stage_ships_its_weights(tiny_set, tmp_path):
    from captioner.model import inference
    from captioner.model.encoder import Encoder, EncoderConfig

    result = CliRunner().invoke(cli, ["train", "--captions", str(tiny_set / "tokens.txt"), "--images",
                                      str(tiny_set / "images"), "--run-dir", str(tmp_path / "run"), "--epochs", "1",
                                      "--scst-epochs", "0", "--tuned-stages", "1", "--lr", "0.01", "--device", "cpu",
                                      "--cache-dir", str(tmp_path / "cache")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert ckpt["encoder"]["tuned_stages"] == 1
    assert any(k.startswith("blocks.6.") for k in ckpt["encoder_top"]) and "conv_head.weight" in ckpt["encoder_top"]
    stock = Encoder(EncoderConfig()).cnn.state_dict()["conv_head.weight"]
    assert not torch.allclose(ckpt["encoder_top"]["conv_head.weight"].float(), stock, atol=1e-3), "the head did not train"
    loaded = inference.load(tmp_path / "run" / "best.pt", device="cpu")
    assert torch.equal(loaded.encoder.cnn.state_dict()["conv_head.weight"], ckpt["encoder_top"]["conv_head.weight"].float())
    assert loaded.caption_images([Image.open(tiny_set / "images" / "photo00.jpg")])[0].text


def test_mirror_cache_holds_the_trunk_of_each_photo_mirrored(tiny_set, tmp_path):
    from PIL import ImageOps

    from captioner.model.data import cached_features
    from captioner.model.encoder import Encoder, EncoderConfig, preprocess

    encoder = Encoder(EncoderConfig(tuned_stages=1))
    names = ["photo00.jpg", "photo04.jpg"]
    index, plain = cached_features(encoder, tiny_set / "images", names, tmp_path)
    _, mirrored = cached_features(encoder, tiny_set / "images", names, tmp_path, mirror=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features-tf_efficientnet_lite0-trunk1-mirror.pt",
                                                           "features-tf_efficientnet_lite0-trunk1.pt"]
    with torch.no_grad():
        expected = encoder.trunk(torch.stack([preprocess(ImageOps.mirror(Image.open(tiny_set / "images" / n)))
                                              for n in names]))
    assert torch.allclose(mirrored.float(), expected, atol=2e-2)
    assert not torch.allclose(plain.float(), expected, atol=2e-2)  # the shapes are off-centre


@pytest.mark.integration  # METEOR and the tokenizer run in Java
def test_evaluate_prints_metrics_as_json_on_its_last_line(tiny_set, tmp_path):
    out = tmp_path / "captions.json"
    result = CliRunner().invoke(cli, ["evaluate", "--images", str(tiny_set / "images"), "--captions",
                                      str(tiny_set / "captions.json"), "--output", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        assert 0 <= metrics[key] <= 10
    assert metrics["images"] == 12
    assert len(json.loads(out.read_text())["captions"]) == 12


def test_evaluate_names_missing_images(tiny_set, tmp_path):
    (tmp_path / "images").mkdir()
    result = CliRunner().invoke(cli, ["evaluate", "--images", str(tmp_path / "images"),
                                      "--captions", str(tiny_set / "captions.json")])
    assert result.exit_code == 1
    assert "12 listed images are not in" in result.output


def test_describe_json_and_unreadable_file(tiny_set, tmp_path):
    bogus = tmp_path / "notes.jpg"
    bogus.write_text("not a photo")
    result = CliRunner().invoke(cli, ["describe", "--json", str(tiny_set / "images" / "photo00.jpg"), str(bogus)])
    assert result.exit_code == 0
    record = json.loads(result.stdout.strip().splitlines()[0])
    assert record["text"].endswith(".") and len(record["candidates"]) == 3 and record["alt_text"]
    assert record["quality"] is None or 0 <= record["quality"] <= 1  # None: a checkpoint without an estimator
    assert "notes.jpg: cannot read image" in result.stderr
