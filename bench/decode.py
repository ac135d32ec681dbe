"""`captioner bench decode`: milliseconds from a 12-megapixel JPEG's bytes to the model's input
tensor on one core, the serving path (core.decode: JPEG draft mode, EXIF orientation) against a
plain full decode and resize, in the same run."""
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

from PIL import Image

from captioner.core import captioner, decode
from captioner.core.settings import Settings

TWELVE_MP = (4000, 3000)


def twelve_megapixel_jpeg(photo: Path, folder: Path) -> bytes:
    """A 4000x3000 JPEG made by upscaling a real photo (camera-like size and quality)."""
    with Image.open(photo) as im:
        big = im.convert("RGB").resize(TWELVE_MP, Image.Resampling.BICUBIC)
    path = folder / "12mp.jpg"
    big.save(path, quality=90)
    return path.read_bytes()


def _median_ms(fn: Callable[[], object], repeats: int, clock: Callable[[], float]) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = clock()
        fn()
        times.append((clock() - started) * 1000)
    return statistics.median(times)


def bench(settings: Settings, data: bytes, repeats: int) -> dict[str, float]:
    """Median ms per image on one thread, CPU and wall time, of the serving path (draft) and of a
    full decode + resize."""
    import torch

    torch.set_num_threads(1)  # the goal is per core; the worker decodes on several threads at once

    def served():
        return captioner.preprocess(decode.decode(data, settings.max_pixels))

    def full():
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # no draft: every one of the 12 million pixels is decoded
            return captioner.preprocess(im.convert("RGB"))

    assert served().shape == full().shape == (3, 224, 224)
    # this thread's CPU time is the cost on one core even on a shared machine; wall time also
    # counts the waits for a core that other processes hold
    return {"draft_cpu": _median_ms(served, repeats, time.thread_time),
            "full_cpu": _median_ms(full, repeats, time.thread_time),
            "draft_wall": _median_ms(served, repeats, time.perf_counter),
            "full_wall": _median_ms(full, repeats, time.perf_counter)}


def run(settings: Settings, photo: Path, repeats: int) -> tuple[bytes, dict[str, float]]:
    """The 12 MP JPEG made from `photo`, and its timings."""
    with tempfile.TemporaryDirectory(prefix="captioner-decode-") as tmp:
        data = twelve_megapixel_jpeg(photo, Path(tmp))
    return data, bench(settings, data, repeats)
