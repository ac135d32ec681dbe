"""Bytes -> RGB image, with limits. Runs on worker threads (Pillow releases the GIL while it decodes).

Limits: bytes are capped by whoever reads them (storage.read, the API's MAX_CONTENT_LENGTH), pixels
here from the header before any pixel is decoded, and time while decoding (see _Deadline)."""
import io
import time

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import InvalidImage

# MPO (multi-picture JPEGs from cameras) opens through the JPEG plugin: naming it here made every
# non-image fail on a KeyError, as Pillow registers no opener under that name.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DRAFT_SIZE = (224, 224)  # the encoder's input; JPEG draft decodes at 1/2..1/8 scale but never below this
# A 64 MP PNG decodes in under a second here, but a progressive JPEG of 8000x8000 with 1,000 repeated
# scans (470 kB) took 38 s: pixel caps cannot bound that, as each scan re-walks every block.
DECODE_SECONDS = 10.0
# Bytes fed to the decoder between deadline checks. With a 1 s limit, that 8000x8000 tarpit stops
# after 2.1 s with 4 kB blocks, 6.8 s with Pillow's default 64 kB; a 12 MP JPEG pays under 1 ms.
DECODE_BLOCK = 4096
ORIENTATION = 0x0112  # the EXIF tag
WHITE = (255, 255, 255)  # transparent pixels become white, as a browser shows them on a page


class _OutOfTime(Exception):
    """Raised inside Pillow's read loop; not an OSError/SyntaxError, which Pillow would swallow."""


class _Deadline(io.BytesIO):
    """Image bytes whose reads fail once the deadline has passed. Pillow feeds its decoders from
    fp.read() in blocks, so this stops a slow decode between two blocks: unlike a thread with a
    timeout it leaves nothing running, and unlike a subprocess it costs nothing per image."""

    def __init__(self, data: bytes, seconds: float):
        super().__init__(data)
        self.nbytes = len(data)  # not getbuffer(): it makes BytesIO copy the bytes it shares
        self.deadline = time.monotonic() + seconds

    def read(self, size: int | None = -1) -> bytes:
        if time.monotonic() > self.deadline:
            raise _OutOfTime
        return super().read(size)


def signature(head: bytes) -> str | None:
    """The format whose signature the data starts with, by Pillow's own checks."""
    Image.init()  # registers every plugin's check once; before any Image.open, Image.OPEN is empty
    for fmt in FORMATS:
        accept = Image.OPEN[fmt][1] if fmt in Image.OPEN else None
        if accept is not None and accept(head):
            return fmt
    return None


def _open(fp: _Deadline, max_pixels: int) -> ImageFile.ImageFile:
    """Image.open with precise errors; the size is that of the first frame, as Pillow reports it
    once a GIF's first frame descriptor has been read."""
    if not fp.nbytes:
        raise InvalidImage("empty file (0 bytes)")
    try:
        im = Image.open(fp, formats=FORMATS)
    except Image.DecompressionBombError as e:  # over twice Image.MAX_IMAGE_PIXELS, raised before any decoding
        raise InvalidImage(f"{e} The limit here is {max_pixels} pixels.", code="image_too_large") from None
    except UnidentifiedImageError:
        head = bytes(fp.getbuffer()[:16])
        # Pillow says "cannot identify" also for a known signature followed by a cut-off header
        claimed = signature(head)
        if claimed:
            raise InvalidImage(f"truncated or corrupt {claimed} header") from None
        raise InvalidImage(f"not an image in a supported format ({', '.join(FORMATS)}); "
                           f"the data starts with {head!r}") from None
    except _OutOfTime:
        raise InvalidImage("reading the image header took too long", code="decode_timeout") from None
    except Exception as e:  # a known format with a broken header: Pillow raises OSError, SyntaxError, struct.error...
        raise InvalidImage(f"unreadable image header ({type(e).__name__}: {e})") from None
    # No warnings.catch_warnings() around open for DecompressionBombWarning: it swaps process-wide
    # filters and this runs on threads. This explicit cap is the check that matters.
    width, height = im.size
    if width * height > max_pixels:
        raise InvalidImage(f"{width}x{height} exceeds the limit of {max_pixels} pixels", code="image_too_large")
    if width < 1 or height < 1:
        raise InvalidImage(f"empty image ({width}x{height})")
    return im


def sniff(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """Read only the header: (format, width, height), or InvalidImage. Cheap enough for the API."""
    im = _open(_Deadline(data, DECODE_SECONDS), max_pixels)
    return im.format or "", *im.size


def baseline_jpeg(data: bytes, max_pixels: int) -> tuple[int, tuple[int, int]] | None:
    """From the header alone, for a photo the model's device may decode (nvJPEG): a baseline
    JPEG in colour or grey -> (EXIF orientation, upright width and height). None for anything
    else, which Pillow decodes under a deadline: a progressive JPEG can hold thousands of scans
    (the tarpit above), and nothing can stop a device decoder midway. InvalidImage as in decode."""
    im = _open(_Deadline(data, DECODE_SECONDS), max_pixels)
    if im.format != "JPEG" or im.mode not in ("RGB", "L") or im.info.get("progressive") or im.info.get("progression"):
        return None
    orientation = im.getexif().get(ORIENTATION, 1)
    width, height = im.size
    return orientation, ((height, width) if orientation in (5, 6, 7, 8) else (width, height))


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any mode -> RGB: 16-bit grey scaled (convert() would clip it to white), alpha on white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        im = im.point(lambda v: v / 256).convert("L")  # 16-bit PNG/TIFF grey: 0..65535 -> 0..255
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
        rgba = im if im.mode == "RGBA" else im.convert("RGBA")  # palette/grey transparency (GIF, tRNS) -> alpha
        # paste through the alpha band: the same blend as alpha_composite over opaque white, with one
        # canvas instead of three copies (an 8000x8000 RGBA PNG peaks at 505 MB RSS here, not 1.2 GB)
        canvas = Image.new("RGB", rgba.size, WHITE)
        canvas.paste(rgba, mask=rgba)
        return canvas
    return im if im.mode == "RGB" else im.convert("RGB")  # CMYK (Adobe-inverted too), L, 1, P, YCbCr


def decode(data: bytes, max_pixels: int, seconds: float = DECODE_SECONDS,
           draft: tuple[int, int] = DRAFT_SIZE) -> Image.Image:
    """Full decode to RGB, upright (EXIF orientation applied), downscaled early for big JPEGs (to
    no less than `draft`); the first frame of an animation; `info["source_size"]` holds the photo's
    upright size. InvalidImage (a precise code) for anything else."""
    fp = _Deadline(data, seconds)
    im = _open(fp, max_pixels)
    try:
        # draft mode: a 12 MP JPEG decodes at 1/8 scale, 13 ms instead of 61 ms here, and the
        # tensor is made from 500x375 pixels, not 4000x3000 (40 ms in all instead of 100-140 ms)
        width, height = im.size
        if im.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8):  # shown turned a quarter: axes swap
            width, height = height, width
        im.draft("RGB", draft)
        im.decodermaxblock = DECODE_BLOCK
        im.load()
        ImageOps.exif_transpose(im, in_place=True)  # a copy per step would double the peak memory
        rgb = _to_rgb(im)
        rgb.info["source_size"] = (width, height)  # the photo's upright size, before draft mode shrank it
        return rgb
    except _OutOfTime:
        raise InvalidImage(f"decoding took longer than {seconds:g} s (a pathological file?)",
                           code="decode_timeout") from None
    except Exception as e:  # truncated or corrupt data surfaces only here, as any of many types
        raise InvalidImage(f"truncated or corrupt image data ({type(e).__name__}: {e})") from None
