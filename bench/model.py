"""Model throughput: images/s of the encoder alone and of encoder + beam search, per runtime and batch size."""
import time
from pathlib import Path

import torch
from PIL import Image

from captioner.model.inference import Captioner


def _time(fn, repeats: int) -> float:
    """Seconds per call of fn, over `repeats` calls."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


@torch.no_grad()
def bench_model(captioners: list[Captioner], image_paths: list[Path], batch_sizes: list[int], beam: int = 3,
                min_images: int = 64, rounds: int = 3) -> list[dict]:
    """Rows of {runtime, precision, batch, encoder_img_s, search_img_s, captions_img_s} on real
    photos (search: encoder + beam search; captions: the whole `caption`, with the re-ranking and
    quality estimate where the checkpoint has an estimator), decoded
    beforehand, one per captioner and batch size. The captioners take turns, `rounds` times, and
    each keeps its fastest round: a machine shared with other work slows a round, never speeds it."""
    tensors = []
    for p in image_paths[: max(batch_sizes)]:
        with Image.open(p) as im:
            tensors.append(captioners[0].preprocess(im))
    while len(tensors) < max(batch_sizes):
        tensors.extend(tensors[: max(batch_sizes) - len(tensors)])
    rows = []
    for bs in batch_sizes:
        repeats = max(1, min_images // bs)
        batches = [torch.stack(tensors[:bs]).to(c.device) for c in captioners]
        for captioner, batch in zip(captioners, batches):
            captioner.caption(batch, beam=beam)  # warm-up: allocations, kernels, caches
        best = [[float("inf")] * 3 for _ in captioners]
        for _ in range(rounds):
            for captioner, batch, times in zip(captioners, batches, best):
                times[0] = min(times[0], _time(lambda: captioner.encode(batch), repeats))
                times[1] = min(times[1], _time(lambda: captioner.hypotheses(batch, beam=beam), repeats))
                times[2] = min(times[2], _time(lambda: captioner.caption(batch, beam=beam), repeats))
        for captioner, (enc_s, search_s, cap_s) in zip(captioners, best):
            rows.append({"runtime": captioner.runtime, "precision": precision(captioner), "batch": bs,
                         "encoder_img_s": bs / enc_s, "search_img_s": bs / search_s, "captions_img_s": bs / cap_s})
    return rows


def precision(captioner: Captioner) -> str:
    """The encoder's arithmetic: ONNX Runtime's graphs are float32, torch's as the captioner says."""
    return "bf16" if captioner.runtime == "torch" and captioner.bf16 else "fp32"


def device_name(device: torch.device) -> str:
    """The card's name, or the CPU threads torch uses: every table says what it was measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{torch.get_num_threads()} CPU threads"
