"""Odd and hostile files through core.decode to the model's input tensor (issue 5, "Hostile and odd
input"). Every file is made here, tiny where possible; tests/test_jobs.py runs a selection of them
through the real model and the per-image failure path."""
import io
import random
import struct
import time
import zlib
from collections.abc import Callable

import pytest
from PIL import Image, ImageChops, ImageStat

from captioner.core.decode import decode, sniff
from captioner.core.errors import InvalidImage
from captioner.core.settings import Settings

LIMIT = Settings().max_pixels
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(image: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand: Pillow cannot save 16-bit colour, nor lie about its size."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows))
            + _chunk(b"IEND", b""))


def gif_header(screen: tuple[int, int], frame: tuple[int, int]) -> bytes:
    """A GIF whose logical screen and first frame claim these sizes, with one byte of pixel data."""
    return (b"GIF89a" + struct.pack("<HHBBB", *screen, 0, 0, 0)
            + b"," + struct.pack("<HHHHB", 0, 0, *frame, 0) + b"\x02\x02\x44\x01\x00;")


def quadrant(size: tuple[int, int] = (80, 40)) -> Image.Image:
    """Black with a red top-left quadrant: every rotation and mirror of it looks different."""
    im = Image.new("RGB", size)
    im.paste(RED, (0, 0, size[0] // 2, size[1] // 2))
    return im


def with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(quadrant(), quality=95, exif=exif)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def transparent_gif() -> bytes:
    im = Image.new("P", (16, 16), 0)
    im.putpalette([0, 0, 0, 255, 0, 0])
    im.paste(1, (0, 0, 8, 16))  # left half red, right half palette 0: transparent black
    return encode(im, "GIF", transparency=0)


def grey16() -> bytes:
    return png(16, 16, 16, 0, b"".join(b"\x00" + struct.pack(">H", 0x8000) * 16 for _ in range(16)))


def rgb16() -> bytes:
    return png(16, 16, 16, 2, b"".join(b"\x00" + struct.pack(">HHH", 0xFF00, 0x8000, 0x0100) * 16 for _ in range(16)))


def rgba16_half_red() -> bytes:
    return png(16, 16, 16, 6, b"".join(b"\x00" + struct.pack(">HHHH", 0xFFFF, 0, 0, 0x8000) * 16 for _ in range(16)))


def tarpit_jpeg(repeats: int) -> bytes:
    """A progressive JPEG with its last scan repeated: libjpeg only warns about the bogus
    progression and re-walks every block for each copy, so the work grows with the file, not
    the pixels (8000x8000 with 1,000 copies: 470 kB, 38 s to decode; 1024x1024 with 4,000: 55 kB, 2 s)."""
    data = encode(Image.new("RGB", (1024, 1024), (120, 130, 140)), progressive=True)
    start = data.rindex(b"\xff\xda")  # SOS of the last scan; entropy data never holds FF DA
    end = data.rindex(b"\xff\xd9")  # EOI
    return data[:end] + data[start:end] * repeats + data[end:]


# name -> (bytes, the pixel at (x, y) the decoded image must show, within JPEG's error)
ODD: dict[str, Callable[[], tuple[bytes, tuple[int, int], tuple[int, int, int]]]] = {
    "cmyk.jpg": lambda: (encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0))), (5, 5), RED),
    "grey.jpg": lambda: (encode(Image.new("L", (32, 32), 100)), (5, 5), (100, 100, 100)),
    "grey16.png": lambda: (grey16(), (5, 5), (128, 128, 128)),  # not clipped to white
    "rgb16.png": lambda: (rgb16(), (5, 5), (255, 128, 1)),
    "rgba16.png": lambda: (rgba16_half_red(), (5, 5), (255, 127, 127)),  # half red over white
    "alpha.png": lambda: (encode(Image.new("RGBA", (16, 16), (0, 0, 0, 0)), "PNG"), (5, 5), WHITE),
    "grey-alpha.png": lambda: (encode(Image.new("LA", (16, 16), (0, 0)), "PNG"), (5, 5), WHITE),
    "palette-transparent.gif": lambda: (transparent_gif(), (12, 5), WHITE),
    "palette-opaque.gif": lambda: (transparent_gif(), (2, 5), RED),
    "animated.gif": lambda: (animated_gif(), (5, 5), RED),  # the first frame
    "photo.webp": lambda: (encode(Image.new("RGB", (16, 16), BLUE), "WEBP", quality=95), (5, 5), BLUE),
    "alpha.webp": lambda: (encode(Image.new("RGBA", (16, 16), (0, 0, 0, 0)), "WEBP", lossless=True), (5, 5), WHITE),
    "photo.tiff": lambda: (encode(Image.new("RGB", (16, 16), BLUE), "TIFF", compression="tiff_lzw"), (5, 5), BLUE),
    "photo.bmp": lambda: (encode(Image.new("RGB", (16, 16), BLUE), "BMP"), (5, 5), BLUE),
    "camera.mpo": lambda: (encode(Image.new("RGB", (16, 16), BLUE), "MPO", save_all=True,
                                  append_images=[Image.new("RGB", (16, 16), RED)]), (5, 5), BLUE),
    "progressive.jpg": lambda: (encode(Image.new("RGB", (300, 200), BLUE), progressive=True), (5, 5), BLUE),
    "one-pixel.png": lambda: (encode(Image.new("RGB", (1, 1), BLUE), "PNG"), (0, 0), BLUE),
    "wide.jpg": lambda: (encode(Image.new("RGB", (4000, 3), BLUE), quality=95), (2000, 1), BLUE),
    "tall.png": lambda: (encode(Image.new("RGB", (3, 4000), BLUE), "PNG"), (1, 2000), BLUE),
}

# name -> (bytes, code, words the message must contain)
HOSTILE: dict[str, Callable[[], tuple[bytes, str, str]]] = {
    "empty.jpg": lambda: (b"", "invalid_image", "empty file"),
    "truncated.jpg": lambda: (encode(Image.effect_noise((256, 256), 64).convert("RGB"))[:3000],
                              "invalid_image", "truncated or corrupt"),
    "truncated.png": lambda: (encode(Image.effect_noise((256, 256), 64), "PNG")[:3000],
                              "invalid_image", "truncated or corrupt"),
    "header-only.png": lambda: (encode(Image.new("RGB", (64, 64)), "PNG")[:33], "invalid_image", "truncated or corrupt"),
    "text.jpg": lambda: (b"hello, world\n", "invalid_image", "not an image in a supported format"),
    "page.jpg": lambda: (b"<!DOCTYPE html><html><body><img src=x></body></html>", "invalid_image",
                         "not an image in a supported format"),
    "drawing.jpg": lambda: (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "invalid_image",
                            "not an image in a supported format"),
    "noise.jpg": lambda: (random.Random(5).randbytes(4096), "invalid_image", "not an image in a supported format"),
    "bomb-60000.png": lambda: (png(60_000, 60_000, 8, 2, b""), "image_too_large", "decompression bomb"),
    "bomb-65535.gif": lambda: (gif_header((65_535, 65_535), (65_535, 65_535)), "image_too_large", "decompression bomb"),
    # a small screen with a big first frame: Pillow grows the canvas, the cap sees the grown size
    "bomb-frame.gif": lambda: (gif_header((16, 16), (9_000, 9_000)), "image_too_large", "9000x9000 exceeds the limit"),
}


@pytest.mark.parametrize("name", ODD)
def test_odd_formats_decode_to_rgb_and_reach_the_model_input(name):
    from captioner.model.encoder import preprocess

    data, xy, colour = ODD[name]()
    im = decode(data, LIMIT)
    assert im.mode == "RGB"
    assert all(abs(a - b) <= 8 for a, b in zip(im.getpixel(xy), colour)), (im.getpixel(xy), colour)
    tensor = preprocess(im)
    assert tuple(tensor.shape) == (3, 224, 224) and tensor.isfinite().all()


@pytest.mark.parametrize("orientation, turn", [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation_turns_the_pixels(orientation, turn):
    """6 = shown turned 90 degrees clockwise, 8 = counter-clockwise (PIL's ROTATE_n turns anticlockwise)."""
    im = decode(with_orientation(orientation), LIMIT)
    other = Image.Transpose.ROTATE_90 if turn == Image.Transpose.ROTATE_270 else Image.Transpose.ROTATE_270

    def mean_diff(expected: Image.Image) -> float:
        return sum(ImageStat.Stat(ImageChops.difference(im, expected)).mean) / 3

    assert im.size == (40, 80)
    assert mean_diff(quadrant().transpose(turn)) < 3  # JPEG noise only
    assert mean_diff(quadrant().transpose(other)) > 30


def test_the_extension_plays_no_part(tmp_path):
    """decode sees bytes only; the pipeline test feeds a PNG named .jpg end to end."""
    liar = tmp_path / "photo.jpg"
    liar.write_bytes(encode(Image.new("RGB", (8, 8), BLUE), "PNG"))
    assert sniff(liar.read_bytes(), LIMIT) == ("PNG", 8, 8)


@pytest.fixture(scope="session")
def photo_12mp() -> bytes:
    """4000x3000 with smooth detail: JPEG-encodes in a fraction of a second, unlike noise."""
    ramp = Image.linear_gradient("L")
    bands = [ramp.resize((4000, 3000)), ramp.rotate(90).resize((4000, 3000)),
             Image.effect_noise((400, 300), 40).resize((4000, 3000))]
    return encode(Image.merge("RGB", bands), quality=90)


def test_a_12_megapixel_jpeg_is_drafted_down_and_reaches_the_tensor_fast(photo_12mp):
    from captioner.model.encoder import preprocess

    started = time.perf_counter()
    im = decode(photo_12mp, LIMIT)
    tensor = preprocess(im)
    elapsed = time.perf_counter() - started
    assert 224 <= min(im.size) and im.size[0] <= 1000  # 1/4 or 1/8 scale, never below the encoder input
    assert tuple(tensor.shape) == (3, 224, 224)
    assert elapsed < 5, f"{elapsed:.2f} s"  # measured ~0.1 s; generous, only catches a lost draft mode


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_files_fail_alone_with_a_precise_code(name):
    data, code, words = HOSTILE[name]()
    started = time.perf_counter()
    with pytest.raises(InvalidImage) as e:
        decode(data, LIMIT)
    assert (e.value.code, words in e.value.message) == (code, True), e.value.message
    assert " at 0x" not in e.value.message  # no object addresses: messages are stored and shown to users
    assert time.perf_counter() - started < 2


@pytest.mark.parametrize("name", ["bomb-60000.png", "bomb-65535.gif", "bomb-frame.gif"])
def test_bombs_are_refused_from_the_header_alone(name):
    data, code, _ = HOSTILE[name]()
    assert len(data) < 100
    with pytest.raises(InvalidImage) as e:
        sniff(data, LIMIT)  # the API's check at upload: no pixel is decoded
    assert e.value.code == code


def test_a_decode_that_outruns_its_time_limit_stops():
    data = tarpit_jpeg(4_000)  # 55 kB; 2.1 s to decode in full here, 20 times the limit below
    started = time.perf_counter()
    with pytest.raises(InvalidImage) as e:
        decode(data, LIMIT, seconds=0.1)
    elapsed = time.perf_counter() - started
    assert e.value.code == "decode_timeout"
    assert elapsed < 3, f"{elapsed:.2f} s"  # stops within one 4 kB read block of the deadline
