"""JPEGs decoded on the model's device (nvJPEG on a GPU worker). This machine has no GPU, so the
same code runs with torchvision's CPU decoder: the routing, the EXIF orientations, the batch with
a bad file in it and the agreement with Pillow's path are what is checked here."""
import io

import pytest
import torch
from PIL import Image, ImageOps
from test_hostile_images import HOSTILE, ODD, encode, quadrant, with_orientation  # a sibling: tests/ is on sys.path

from captioner.core import decode
from captioner.core.errors import InvalidImage
from captioner.model import inference


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return inference.load(tiny_checkpoint, device="cpu")


def _pillow_path(model, data: bytes) -> torch.Tensor:
    return model.preprocess(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_comes_out_upright_as_with_pillow(model, orientation):
    data = with_orientation(orientation)
    upright = decode.baseline_jpeg(data, 10**6)
    assert upright is not None and upright[0] == orientation
    w, h = quadrant().size
    assert upright[1] == ((h, w) if orientation in (5, 6, 7, 8) else (w, h))
    [tensor] = model.decode_jpegs([(data, orientation)])
    assert tensor.shape == (3, 224, 224)
    # four flat colour quadrants: a wrong flip or turn moves a whole quadrant (difference ~1)
    assert (tensor - _pillow_path(model, data)).abs().mean() < 0.02


def test_a_photo_decodes_close_to_pillows_draft_path(model, photos):
    data = photos[0].read_bytes()
    [tensor] = model.decode_jpegs([(data, 1)])
    # libjpeg's DCT-domain downscale (draft mode) and a full decode differ only in fine detail
    assert (tensor - _pillow_path(model, data)).abs().mean() < 0.05


def test_a_file_the_decoder_refuses_is_none_and_spares_the_rest(model, photos):
    truncated = HOSTILE["truncated.jpg"]()[0]
    good = photos[0].read_bytes()
    out = model.decode_jpegs([(good, 1), (truncated, 1), (good, 1)])
    assert out[1] is None and out[0] is not None and torch.equal(out[0], out[2])


def test_only_baseline_colour_jpegs_go_to_the_device():
    assert decode.baseline_jpeg(encode(quadrant(), quality=90), 10**6) == (1, quadrant().size)
    assert decode.baseline_jpeg(encode(quadrant().convert("L"), quality=90), 10**6) is not None
    # a progressive file can hold thousands of scans: Pillow decodes it under a deadline
    assert decode.baseline_jpeg(ODD["progressive.jpg"]()[0], 10**6) is None
    assert decode.baseline_jpeg(ODD["cmyk.jpg"]()[0], 10**6) is None
    assert decode.baseline_jpeg(encode(quadrant(), "PNG"), 10**6) is None
    with pytest.raises(InvalidImage) as refused:  # the limits hold before any decoder sees the data
        decode.baseline_jpeg(encode(Image.new("RGB", (300, 300)), quality=50), 300 * 299)
    assert refused.value.code == "image_too_large"
