"""Small WebP renditions of an image for the web interface, made on first request and kept in the
service's storage, so the browser never gets the full photo and no photo is decoded twice.

A rendition is named by the image's content (its sha256, or for an S3 object listed but never
read, its fingerprint: bucket, key and ETag) and the size, so the same photo of two tenants, or
submitted twice, has one rendition, and a changed S3 object gets a new one."""
import hashlib
import io

from PIL import Image as PILImage

from . import decode, storage
from .errors import NotFound
from .settings import Settings
from .tables import Image

SIZES = {"thumbnail": 320, "preview": 1024}  # longest side in pixels: the gallery's cards, the image page
WEBP_QUALITY = 80  # a 320 px photo is 10-20 kB: a page of 24 cards weighs less than one full photo


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


def get(settings: Settings, image: Image, size: str) -> bytes:
    """The rendition's bytes: from storage when it was made before, else made now and stored.
    InvalidImage when the photo cannot be decoded; NotFound when its bytes are gone."""
    uri = storage.location(settings.storage, key(image, size))
    try:
        return storage.read(uri, settings.max_upload_bytes)
    except NotFound:  # not made yet: one GET on the common path, not a HEAD and then a GET
        data = render(storage.read(image.uri, settings.max_upload_bytes), SIZES[size], settings.max_pixels)
        storage.write(uri, data)
        return data
