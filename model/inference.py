"""The model's one entry point for everything that captions: load once, caption batches."""
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from . import encoder as enc
from . import onnx_runtime, quality, repeats
from .alt_text import alt_text, sentence
from .beam_search import Encoded, Hypothesis, decoder_step, search
from .network import Decoder, DecoderConfig
from .vocab import SPECIALS, Vocab

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "default.pt"
# "auto": ONNX Runtime on a CPU (encoder 4-5x, beam search step 2.5x eager torch's speed there, see
# docs/benchmarks.md), torch on a GPU, where its kernels and nvJPEG decoding are the tuned path
RUNTIMES = ("auto", "torch", "onnx")
REVIEW_BELOW = 0.35  # without a quality estimator: confidence under which alt text is flagged
REVIEW_RISK = 0.10  # the share of unreviewed captions allowed to be wrong, by default
TAGS = 5  # ImageNet labels returned per image
TAG_MIN_PROB = 0.05
# EXIF orientation -> what makes a decoded (C, H, W) image upright, as Pillow's exif_transpose does
UPRIGHT = {
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-2, -1),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-2, -1),
    6: lambda x: x.rot90(-1, (-2, -1)),
    7: lambda x: x.flip(-2, -1).transpose(-2, -1),
    8: lambda x: x.rot90(1, (-2, -1)),
}


@dataclass(frozen=True)
class Caption:
    text: str  # the best caption as a sentence
    alt_text: str  # the same, shaped for an HTML alt attribute
    candidates: list[tuple[str, float]]  # n-best (sentence, confidence), best first
    tags: list[tuple[str, float]]  # ImageNet labels with probabilities
    confidence: float  # geometric-mean probability per word of the best caption, 0..1
    needs_review: bool  # a person should check it: quality over the review threshold of risk, or
    # without a fitted estimator confidence below REVIEW_BELOW
    quality: float | None = None  # estimated probability that the caption is right (model/quality.py)


class RuntimeUnavailable(RuntimeError):
    """The runtime asked for cannot run this model here (package missing, export failed or differs)."""


def bf16_supported(device: torch.device) -> bool:
    """bf16 matrix units: CUDA (Ampere and later) or a CPU with AVX512-BF16 / AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.cpu._is_avx512_bf16_supported()


class Captioner:
    def __init__(self, checkpoint: dict, version: str, device: str | torch.device = "cpu", bf16: bool | None = None,
                 runtime: str = "torch", onnx_cache: Path | None = None, review_risk: float = REVIEW_RISK):
        """bf16: run the torch encoder under bf16 autocast (None = where the hardware has bf16 units);
        the decoder and beam search stay in float32, where the scores accumulate.
        runtime: one of RUNTIMES; `self.runtime` says which one captions.
        onnx_cache: where ONNX exports are kept (default: default_onnx_cache()).
        review_risk: captions go to review unless their estimated quality is at or above the
        threshold at which the dev split's published captions were at most this share wrong."""
        self.device = torch.device(device)
        self.bf16 = bf16_supported(self.device) if bf16 is None else bf16
        self.version = version
        self.vocab = Vocab(checkpoint["vocab"])
        self.max_len = int(checkpoint["max_len"])
        self.encoder = enc.Encoder(enc.EncoderConfig(**checkpoint["encoder"]))
        if checkpoint.get("encoder_top"):  # stages fine-tuned in training replace the wheel's weights
            unexpected = self.encoder.cnn.load_state_dict(
                {k: v.float() for k, v in checkpoint["encoder_top"].items()}, strict=False).unexpected_keys
            if unexpected:
                raise ValueError(f"encoder weights in the checkpoint do not fit the backbone: {unexpected[:3]}")
        # channels_last: oneDNN's and cuDNN's depthwise-convolution kernels want NHWC; on a 2-core
        # AVX-512 CPU it made the encoder 2.5x faster
        self.encoder.to(self.device, memory_format=torch.channels_last)
        self.decoder = Decoder(DecoderConfig(**checkpoint["config"]))
        self.decoder.load_state_dict({k: v.float() for k, v in checkpoint["model"].items()})
        self.decoder.to(self.device).eval()
        self.class_names = enc.class_names()
        self.metrics = checkpoint.get("metrics", {})
        self.repeat_rule = repeats.rule(self.vocab.words, len(SPECIALS))
        self.estimator, self.neighbours, self.words, self.review_threshold = None, None, None, None
        if checkpoint.get("quality"):
            try:
                self.estimator = quality.Estimator.from_state(checkpoint["quality"])
                self.neighbours = quality.Neighbours.from_state(checkpoint["neighbours"])
                self.words = quality.Words.from_state(checkpoint["words"])
                self.review_threshold = self.estimator.threshold(review_risk)
            except (KeyError, ValueError) as e:  # fitted by an older captioner: its signals are not ours
                self.estimator = None
                log.warning("model %s has a caption-quality estimator this version cannot use (%s); run captioner "
                            "calibrate again. Until then quality is null and captions with confidence under %.2f go "
                            "to review", version, e, REVIEW_BELOW)
        else:
            log.warning("model %s has no caption-quality estimator (captioner calibrate fits one): quality is "
                        "null and captions with confidence under %.2f go to review", version, REVIEW_BELOW)
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
        self.runtime, self.onnx = "torch", None
        if runtime == "onnx" or (runtime == "auto" and self.device.type == "cpu"):
            self._start_onnx(explicit=runtime == "onnx", cache=Path(onnx_cache or default_onnx_cache()))

    def _start_onnx(self, explicit: bool, cache: Path) -> None:
        """Export (or find cached) and load the ONNX graphs; `auto` falls back to torch with one warning."""
        try:
            import onnxruntime as ort
            providers = ["CPUExecutionProvider"]
            if self.device.type == "cuda":
                if "CUDAExecutionProvider" not in ort.get_available_providers():
                    raise RuntimeUnavailable("this onnxruntime has no CUDA provider: install onnxruntime-gpu, "
                                             "or caption on the GPU with runtime torch")
                providers.insert(0, "CUDAExecutionProvider")
            self.onnx = onnx_runtime.load(self.encoder, self.decoder, self.version, Path(cache),
                                          torch.get_num_threads(), providers, self._search_options())
            self.runtime = "onnx"
        except ImportError as e:
            self._onnx_failed(explicit, f"the onnxruntime package is not installed ({e}): "
                                        "pip install 'captioner[worker]' or onnxruntime")
        except (onnx_runtime.ExportError, RuntimeUnavailable, OSError) as e:
            self._onnx_failed(explicit, str(e))

    def _onnx_failed(self, explicit: bool, why: str) -> None:
        if explicit:
            raise RuntimeUnavailable(f"runtime onnx: {why}")
        log.warning("ONNX Runtime not used, captioning with torch: %s", why)

    def _search_options(self, beam: int = 3, n_best: int = 3) -> dict:
        return {"start": self.vocab.start, "end": self.vocab.end,
                "banned_words": [self.vocab.pad, self.vocab.start, self.vocab.unk],
                "beam": beam, "n_best": min(n_best, beam), "max_len": self.max_len, **self.repeat_rule}

    preprocess = staticmethod(enc.preprocess)

    @torch.no_grad()
    def encode(self, batch: torch.Tensor) -> Encoded:
        """batch (B, 3, 224, 224) from `preprocess` -> the beam search's start over these images,
        in this captioner's runtime."""
        assert batch.dim() == 4 and batch.shape[1] == 3, f"expected (B, 3, H, W), got {tuple(batch.shape)}"
        if self.onnx is not None:
            return self.onnx.encode(batch)
        if self.device.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory()  # page-locked: the copy below runs asynchronously
        images = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            feats, logits = self.encoder(images)
        feats = feats.float()  # (B, P, C)
        return Encoded(*decoder_step(self.decoder, feats), logits, feats.mean(1))

    @torch.no_grad()
    def hypotheses(self, batch: torch.Tensor, beam: int = 3, n_best: int = 3) -> tuple[Encoded, list[list[Hypothesis]]]:
        """batch (B, 3, 224, 224) from `preprocess` -> the encoder's output and each image's n-best."""
        encoded = self.encode(batch)
        return encoded, search(encoded.step, encoded.h, encoded.c, **self._search_options(beam, n_best))

    def sentence(self, hypothesis: Hypothesis) -> str:
        return sentence(self.vocab.decode(hypothesis.tokens))

    def _judge(self, hyps: list[list[Hypothesis]], pooled: torch.Tensor) -> tuple[list[list[Hypothesis]], list[float]]:
        """Re-rank each image's n-best by consensus with its nearest training photos (the chosen one
        first) and estimate the chosen caption's quality."""
        width = min(len(h) for h in hyps)  # n_best each, unless a search ran short
        agreed = quality.agreement([[self.sentence(x) for x in h[:width]] for h in hyps], pooled, self.neighbours,
                                   self.words)
        scores = torch.tensor([[x.score for x in h[:width]] for h in hyps])
        chosen = quality.rerank(scores, agreed, self.estimator.rerank_weight)
        features = quality.signals([h[c].word_logps for h, c in zip(hyps, chosen.tolist())], agreed, chosen)
        reordered = [[h[c], *h[:c], *h[c + 1:]] for h, c in zip(hyps, chosen.tolist())]
        return reordered, [round(q, 4) for q in self.estimator(features).tolist()]

    @torch.no_grad()
    def caption(self, batch: torch.Tensor, beam: int = 3, n_best: int = 3) -> list[Caption]:
        """batch (B, 3, 224, 224) from `preprocess` -> one Caption per image, one forward pass."""
        encoded, hyps = self.hypotheses(batch, beam, n_best)
        estimates: list[float | None] = [None] * len(hyps)
        if self.estimator is not None:
            hyps, estimates = self._judge(hyps, encoded.pooled)
        probs = encoded.logits.float().softmax(-1)
        top_p, top_i = probs.topk(TAGS, dim=1)
        out = []
        for image_hyps, estimate, ps, idx in zip(hyps, estimates, top_p.tolist(), top_i.tolist()):
            candidates = [(self.sentence(h), float(torch.tensor(h.score).exp())) for h in image_hyps]
            text, confidence = candidates[0]
            review = confidence < REVIEW_BELOW if estimate is None else estimate < self.review_threshold
            tags = [(self.class_names[i], round(p, 4)) for p, i in zip(ps, idx) if p >= TAG_MIN_PROB]
            out.append(Caption(text, alt_text(text), candidates, tags, confidence, review, estimate))
        return out

    def decode_jpegs(self, jpegs: list[tuple[bytes, int]]) -> list[torch.Tensor | None]:
        """(JPEG bytes, EXIF orientation) pairs -> upright, normalised (3, 224, 224) tensors on the
        model's device, decoded there: by nvJPEG on a GPU, libjpeg-turbo on a CPU. None for an image
        the decoder refused; the caller decodes it another way."""
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b, _ in jpegs]
        try:
            images: list[torch.Tensor | None] = list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad image fails the whole call: find it one by one
            images = []
            for d in data:
                try:
                    images.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    images.append(None)
        return [None if im is None else enc.resize_normalize(UPRIGHT.get(o, lambda x: x)(im))
                for im, (_, o) in zip(images, jpegs, strict=True)]

    def caption_images(self, images: list[Image.Image], beam: int = 3, n_best: int = 3) -> list[Caption]:
        return self.caption(torch.stack([self.preprocess(im) for im in images]), beam=beam, n_best=n_best)


def default_onnx_cache() -> Path:
    """$XDG_CACHE_HOME/captioner/onnx, read when a model loads."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "captioner" / "onnx"


def checkpoint_version(path: Path) -> str:
    """The model version: the first 12 hex digits of the checkpoint file's sha256."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def load(path: str | Path | None = None, device: str | None = None, bf16: bool | None = None,
         runtime: str = "torch", onnx_cache: str | Path | None = None, review_risk: float = REVIEW_RISK) -> Captioner:
    """Load a checkpoint (default: the shipped one) onto `device` (default: CUDA if present);
    `bf16`, `runtime`, `onnx_cache` and `review_risk` as in Captioner."""
    path = Path(path) if path else DEFAULT_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # weights_only: a checkpoint may come from S3 or a user, and must not run code when loaded
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("config", "encoder", "vocab", "model", "max_len"):
        if key not in checkpoint:
            raise ValueError(f"{path} is not a captioner checkpoint (no {key!r})")
    return Captioner(checkpoint, checkpoint_version(path), device, bf16, runtime, onnx_cache, review_risk)
