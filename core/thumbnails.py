"""Small WebP renditions of an image for the web interface, made on first request and kept in the
service's storage, so the browser never gets the full photo and no photo is decoded twice.

A rendition is named by the image's content (its sha256, or for an S3 object listed but never
read, its fingerprint: bucket, key and ETag) and the size, so the same photo of two tenants, or
submitted twice, has one rendition, and a changed S3 object gets a new one.

The API never decodes an untrusted photo in its own process: a rendition is made only for an
image a worker has captioned (so it decoded within the limits), and then in a child process with
a lower pixel cap, a memory limit and a deadline. A failure is kept beside the renditions, so the
same photo is never decoded again to fail again."""
import hashlib
import io
import resource
import subprocess
import sys

from PIL import Image as PILImage

from . import decode, storage
from .errors import Conflict, InvalidImage, NotFound
from .settings import Settings
from .tables import Image

SIZES = {"thumbnail": 320, "preview": 1024}  # longest side in pixels: the gallery's cards, the image page
WEBP_QUALITY = 80  # a 320 px photo is 10-20 kB: a page of 24 cards weighs less than one full photo
MAX_PIXELS = 16_000_000  # a rendition's source, at most: lower than the worker's cap
RENDER_SECONDS = 10  # a photo made to decode slowly is given up after this
RENDER_MEMORY = 1 << 30  # the child's address space: a decompression bomb fails there, not in the API


def _digest(image: Image) -> str:
    return image.sha256 or hashlib.sha256(image.fingerprint.encode()).hexdigest()


def key(image: Image, size: str) -> str:
    digest = _digest(image)
    return f"thumbnails/{SIZES[size]}/{digest[:2]}/{digest}.webp"


def etag(image: Image, size: str) -> str:
    """Stable for as long as the rendition is: it depends on the image's content and the size only."""
    return f"{_digest(image)[:32]}-{SIZES[size]}"


def render(data: bytes, longest: int, max_pixels: int) -> bytes:
    """Image bytes -> a WebP no larger than longest x longest, upright. The same decoding as the
    worker's (limits, EXIF orientation, transparency on white), with JPEG draft mode sized for the
    rendition: a 12 MP JPEG decodes at 1/4 or 1/8 scale."""
    im = decode.decode(data, max_pixels, draft=(longest, longest))
    im.thumbnail((longest, longest), PILImage.Resampling.LANCZOS)
    out = io.BytesIO()
    im.save(out, "WEBP", quality=WEBP_QUALITY, method=4)
    return out.getvalue()


def _failed_key(image: Image, size: str) -> str:
    return key(image, size).removesuffix(".webp") + ".failed"


def render_bounded(data: bytes, longest: int, max_pixels: int) -> bytes:
    """render() in a child process with a memory limit and a deadline -> the WebP, or InvalidImage."""
    try:
        done = subprocess.run([sys.executable, "-m", "captioner.core.thumbnails", str(longest),
                               str(min(max_pixels, MAX_PIXELS))], input=data, capture_output=True,
                              timeout=RENDER_SECONDS)
    except subprocess.TimeoutExpired:
        raise InvalidImage(f"the photo did not decode within {RENDER_SECONDS} s") from None
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["it could not be decoded"]
        raise InvalidImage(f"no rendition: {why[0][:300]}")
    return done.stdout


def get(settings: Settings, image: Image, size: str, captioned: bool) -> bytes:
    """The rendition's bytes: from storage when it was made before, else made now (in a bounded
    child process) and stored. Conflict before a worker has captioned the image; InvalidImage when
    the photo cannot be rendered (then and every time after, without decoding it again);
    NotFound when its bytes are gone."""
    uri = storage.location(settings.storage, key(image, size))
    try:
        return storage.read(uri, settings.max_upload_bytes)
    except NotFound:  # not made yet: one GET on the common path, not a HEAD and then a GET
        pass
    failed = storage.location(settings.storage, _failed_key(image, size))
    try:
        raise InvalidImage(storage.read(failed, 4096).decode(errors="replace"))
    except NotFound:
        pass
    if not captioned:
        raise Conflict(f"image {image.id} has no {size} yet: it is made once a worker has captioned the image",
                       code="not_captioned")
    try:
        data = render_bounded(storage.read(image.uri, settings.max_upload_bytes), SIZES[size], settings.max_pixels)
    except InvalidImage as e:
        storage.write(failed, e.message.encode())  # remembered: the next request does not decode it again
        raise
    storage.write(uri, data)
    return data


def _main(longest: str, max_pixels: str) -> None:
    """The child process: stdin's image -> stdout's WebP; an error on stderr, exit status 1."""
    resource.setrlimit(resource.RLIMIT_AS, (RENDER_MEMORY, RENDER_MEMORY))
    try:
        out = render(sys.stdin.buffer.read(), int(longest), int(max_pixels))
    except Exception as e:  # noqa: BLE001 (reported to the parent, which raises InvalidImage)
        sys.stderr.write(f"{getattr(e, 'message', e)}\n")
        sys.exit(1)
    sys.stdout.buffer.write(out)


if __name__ == "__main__":
    _main(*sys.argv[1:3])
