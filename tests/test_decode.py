import io

import pytest
from PIL import Image

from captioner.core.decode import decode, sniff
from captioner.core.errors import InvalidImage

LIMIT = 50_000_000


def encode(image: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def test_decodes_to_rgb():
    im = decode(encode(Image.new("L", (300, 200), 128)), LIMIT)
    assert im.mode == "RGB" and im.size == (300, 200)


def test_large_jpeg_is_drafted_down_but_not_below_the_encoder_input():
    im = decode(encode(Image.new("RGB", (2000, 1600), (10, 200, 30))), LIMIT)
    assert 224 <= min(im.size) < 1600
    assert im.info["source_size"] == (2000, 1600)  # what the API reports as the photo's size


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: stored landscape, shown portrait
    im = decode(encode(Image.new("RGB", (400, 300)), exif=exif), LIMIT)
    assert im.size == (300, 400) and im.info["source_size"] == (300, 400)


def test_png_with_alpha_becomes_rgb():
    assert decode(encode(Image.new("RGBA", (64, 64), (0, 0, 0, 0)), "PNG"), LIMIT).mode == "RGB"


@pytest.mark.parametrize("data", [b"", b"hello, world", b"\xff\xd8\xff" + b"\x00" * 100, b"%PDF-1.4 ..."])
def test_junk_is_an_invalid_image(data):
    with pytest.raises(InvalidImage) as e:
        decode(data, LIMIT)
    assert e.value.code == "invalid_image"


def test_truncated_jpeg_is_an_invalid_image():
    data = encode(Image.effect_noise((640, 480), 64).convert("RGB"))
    with pytest.raises(InvalidImage) as e:
        decode(data[: len(data) // 2], LIMIT)
    assert e.value.code == "invalid_image"


def test_too_many_pixels_is_refused_from_the_header():
    data = encode(Image.new("1", (4000, 3000)), "PNG")  # tiny file, 12 MP once decoded
    with pytest.raises(InvalidImage) as e:
        sniff(data, max_pixels=10_000_000)
    assert e.value.code == "image_too_large"


def test_sniff_reports_format_and_size():
    assert sniff(encode(Image.new("RGB", (32, 16)), "PNG"), LIMIT) == ("PNG", 32, 16)


def test_signature_knows_every_format_before_any_image_was_opened():
    # Pillow registers its format checks when a first image is opened: a process that only sorts
    # S3 objects (the API) must know them all the same
    import subprocess
    import sys
    code = ("from captioner.core import decode; "
            "print([decode.signature(h) for h in (b'\\xff\\xd8\\xff\\xe0', b'\\x89PNG\\r\\n\\x1a\\n', b'RIFF\\0\\0\\0\\0WEBPVP8 ', "
            "b'GIF89a', b'II*\\0', b'hello')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['JPEG', 'PNG', 'WEBP', 'GIF', 'TIFF', None]"
