"""Model throughput: images/s of the encoder alone and of encoder + beam search, per batch size."""
import time
from pathlib import Path

import torch
from PIL import Image

from captioner.model.inference import Captioner


def _time(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, kernels, caches
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


@torch.no_grad()
def bench_model(captioner: Captioner, image_paths: list[Path], batch_sizes: list[int], beam: int = 3,
                min_images: int = 64) -> list[dict]:
    """Rows of {batch, encoder_img_s, captions_img_s} on real photos, decoded beforehand."""
    tensors = []
    for p in image_paths[: max(batch_sizes)]:
        with Image.open(p) as im:
            tensors.append(captioner.preprocess(im))
    while len(tensors) < max(batch_sizes):
        tensors.extend(tensors[: max(batch_sizes) - len(tensors)])
    rows = []
    for bs in batch_sizes:
        batch = torch.stack(tensors[:bs]).to(captioner.device)
        repeats = max(1, min_images // bs)
        enc_s = _time(lambda: captioner.encoder(batch), repeats)
        cap_s = _time(lambda: captioner.caption(batch, beam=beam), repeats)
        rows.append({"batch": bs, "encoder_img_s": bs / enc_s, "captions_img_s": bs / cap_s})
    return rows


def device_name(device: torch.device) -> str:
    """The card's name, or the CPU threads torch uses: every table says what it was measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{torch.get_num_threads()} CPU threads"
