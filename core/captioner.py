"""The only door from core/ to model/. torch is imported lazily, so processes that never
caption (the API, the CLI's read commands) never load it."""
import ctypes
import ctypes.util
import hashlib
import importlib.util
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError
from .settings import PRECISIONS, Settings

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage
    from torch import Tensor

    from captioner.model.inference import Caption as ModelCaption
    from captioner.model.inference import Captioner

GPU_BATCH, CPU_BATCH = 256, 64  # batch 32 runs a GPU at a seventh of batch 256's rate (field notes); a CPU batch holds two forwards
# `captioner bench pipeline`, 2-core AVX-512 host, bf16, raw captions/s at forwards of 16 and 32, three
# runs: 43.7 and 45.3, 27.4 and 37.2, 34.5 and 39.0
CPU_FORWARD = 32

# glibc mallopt parameters: a forward's activations are blocks of 0.1-30 MB, which glibc maps
# fresh (and the kernel zeroes page by page) on every forward and trims from the heap after it.
# Keeping them in the heap: raw model 51-53 -> 55-57 captions/s, end to end 38-39 -> 42 (2-core host)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for this parameter on 64-bit
TRIM_THRESHOLD = 1 << 30

log = logging.getLogger(__name__)

_loaded: "Captioner | None" = None  # the one lazily loaded global: weights load once per process, after fork
_loading = threading.Lock()


def checkpoint_path(settings: Settings) -> Path:
    """The configured checkpoint, else the shipped one, found without importing model/ (and torch)."""
    if settings.model_path:
        return Path(settings.model_path)
    spec = importlib.util.find_spec("captioner.model")
    if spec is None or spec.origin is None:
        raise ConfigError("the model package is not installed")
    return Path(spec.origin).parent / "checkpoints" / "default.pt"


def batch_size(settings: Settings) -> int:
    """The configured batch size, else one for the device the model will load on, decided without
    torch: the worker's parent must not touch CUDA before it forks its pool."""
    if settings.batch_size:
        return settings.batch_size
    return GPU_BATCH if _on_gpu(settings) else CPU_BATCH


def _on_gpu(settings: Settings) -> bool:
    return settings.device.startswith("cuda") if settings.device else Path("/proc/driver/nvidia/version").exists()


def forward_size(settings: Settings) -> int:
    """Images per model forward: the configured size, else the whole batch on a GPU and
    CPU_FORWARD on a CPU; never more than the batch."""
    size = settings.forward_size or (batch_size(settings) if _on_gpu(settings) else CPU_FORWARD)
    return min(size, batch_size(settings))


def decodes_on_device(settings: Settings) -> bool:
    """Whether baseline JPEGs go to the model's device undecoded (nvJPEG), not through Pillow."""
    return settings.jpeg_decode == "device" or (settings.jpeg_decode == "auto" and _on_gpu(settings))


def decode_jpegs(settings: Settings, jpegs: list[tuple[bytes, int]]) -> "list[Tensor | None]":
    """(JPEG bytes, EXIF orientation) -> input tensors decoded on the model's device; None where refused."""
    return get(settings).decode_jpegs(jpegs)


def version(settings: Settings) -> str:
    """The model version jobs are submitted for: the checkpoint's short sha256, as
    model.inference.checkpoint_version computes it (a test holds the two together)."""
    path = checkpoint_path(settings)
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    except FileNotFoundError:
        raise ConfigError(f"no model checkpoint at {path} (set CAPTIONER_MODEL_PATH)") from None


def get(settings: Settings) -> "Captioner":
    """The loaded model, loaded on first use in this process (CUDA cannot start before a fork)."""
    global _loaded
    if _loaded is None:
        with _loading:
            if _loaded is None:
                _loaded = load(settings, checkpoint_path(settings))
    return _loaded


def load(settings: Settings, path: Path, device: str | None = None, runtime: str | None = None) -> "Captioner":
    """A model from the checkpoint at `path`, on the settings' device, precision and runtime unless
    given; a runtime asked for by name that cannot run here is a ConfigError that says why."""
    from captioner.model import inference  # keeps torch out of processes that never caption
    _keep_tensors_in_heap()
    try:
        model = inference.load(path, device=device or settings.device, bf16=PRECISIONS[settings.precision],
                               runtime=runtime or settings.runtime, onnx_cache=settings.onnx_cache,
                               review_risk=settings.review_risk)
    except inference.RuntimeUnavailable as e:
        raise ConfigError(str(e)) from e
    return model


def runtime_plan(settings: Settings) -> str:
    """The runtime a model loaded here would run in, decided without loading torch (for /readyz):
    `auto` takes ONNX Runtime on a CPU host where it is installed."""
    if settings.runtime != "auto":
        return settings.runtime
    return "onnx" if not _on_gpu(settings) and importlib.util.find_spec("onnxruntime") else "torch"


def describe(model: "Captioner") -> str:
    """What runs the model, for start-up logs: the runtime, its device or providers, its threads."""
    import torch
    if model.onnx is not None:
        return f"runtime onnx ({', '.join(model.onnx.providers)}, {model.onnx.threads} threads)"
    return (f"runtime torch on {model.device} ({torch.get_num_threads()} threads, "
            f"bf16 encoder {'on' if model.bf16 else 'off'})")


def warm_up(settings: Settings) -> None:
    """One forward of forward_size blank images, before the first batch: the heap grows to a full
    forward's activations and the kernels for its shapes are chosen now. A worker warmed with 4
    photos took 1.58 s in the model for its first batch of 64 and 1.23-1.30 s for the next ones."""
    import torch
    caption_batch(settings, [torch.zeros(3, 224, 224)] * forward_size(settings))


def io_pool(threads: int) -> ThreadPoolExecutor:
    """The threads that fetch, decode and preprocess a batch's images while this thread runs the
    model. Their torch ops run on the calling thread only: OpenMP gives every thread that starts a
    parallel op a team of its own, and the I/O threads' teams, spinning beside the forward's, slowed
    it by a quarter here (`captioner bench pipeline`); the DataLoader's workers run single-threaded
    for the same reason. torch fixes a thread's count at its first parallel op, from the last one
    set anywhere, so this thread takes its own first."""
    import torch
    torch.get_num_threads()
    return ThreadPoolExecutor(max_workers=threads, initializer=_one_torch_thread)


def _one_torch_thread() -> None:
    import torch
    torch.get_num_threads()  # fix this thread's count now, or its first op would take the global one back
    torch.set_num_threads(1)


def _keep_tensors_in_heap() -> None:
    """Where the C library is glibc (elsewhere nothing changes): serve big blocks from the heap and
    keep up to TRIM_THRESHOLD of freed heap for the next forward instead of returning it."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def preprocess(image: "PILImage") -> "Tensor":
    """PIL image -> (3, 224, 224) tensor; thread-safe, called on the I/O threads, which must not be
    the ones to load the model: they run torch single-threaded, and the model's runtime takes its
    thread count from the thread that loads it."""
    from captioner.model.encoder import preprocess
    return preprocess(image)


def caption_batch(settings: Settings, tensors: "list[Tensor]") -> "list[ModelCaption]":
    """One model forward for the whole batch: a per-image loop would waste the device."""
    import torch
    model = get(settings)
    if any(t.device.type != "cpu" for t in tensors):  # some were decoded on the device already
        tensors = [t.to(model.device) for t in tensors]
    return model.caption(torch.stack(tensors), beam=settings.beam, n_best=settings.n_best)  # (B, 3, 224, 224)
