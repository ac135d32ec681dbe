"""ONNX Runtime for inference: the encoder and the decoder's step, exported from a checkpoint.

The .onnx files are derived, never edited: exported on first use into a cache folder named by the
model version, checked there against torch on a fixed batch, and listed with their sha256 in a
manifest. A folder whose manifest is missing, stale or does not match its files is rebuilt.
torch stays the reference and the only runtime for training.
"""
import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .beam_search import Encoded, search

log = logging.getLogger(__name__)

FORMAT = 1  # the graphs' inputs and outputs; a change makes every cached export stale
FILES = ("encode.onnx", "step.onnx")
ATOL = 1e-3  # largest difference allowed between the runtimes' outputs on the check batch
CHECK_IMAGES = 8


class ExportError(RuntimeError):
    """The checkpoint's model cannot run in ONNX Runtime, or runs there differently from torch."""


class _Encode(nn.Module):
    """images (B, 3, 224, 224) -> attention features, keys, initial h and c, ImageNet logits."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, images):
        feats, logits = self.encoder(images)
        keys, h, c = self.decoder.start(feats)
        return feats, keys, h, c, logits


class _Step(nn.Module):
    """feats, keys (L, ...) and K rows per image of words (L*K,), h, c -> log-probabilities, h, c."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, feats, keys, words, h, c):
        logits, h, c, _ = self.decoder.step(feats, keys, words, h, c)
        return logits.log_softmax(-1), h, c


def check_batch() -> torch.Tensor:
    """A fixed batch of smooth random images (seeded), normalised like the model's inputs: the
    same on every machine, so an export is checked on the same pixels everywhere."""
    g = torch.Generator().manual_seed(20261204)
    coarse = torch.rand(CHECK_IMAGES, 3, 7, 7, generator=g)
    images = nn.functional.interpolate(coarse, size=(224, 224), mode="bicubic", align_corners=False)
    return (images.clamp(0, 1) - 0.5) / 0.5


class OnnxModel:
    """The two exported graphs in ONNX Runtime sessions."""

    def __init__(self, folder: Path, threads: int, providers: list[str]):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # its warnings about unused initialisers are not ours to act on
        # between two steps the beam search runs torch ops on the same cores: ONNX Runtime's threads,
        # spinning while they wait for the next run, slowed those ops tenfold (captions 73 -> 129
        # img/s at batch 32 on 2 cores without the spinning)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.encode_session = ort.InferenceSession(str(folder / "encode.onnx"), options, providers=providers)
        self.step_session = ort.InferenceSession(str(folder / "step.onnx"), options, providers=providers)
        self.providers = self.step_session.get_providers()
        self.threads = threads

    def encode(self, images: torch.Tensor) -> Encoded:
        """images (B, 3, H, W) -> the beam search's start over them."""
        feats, keys, h, c, logits = self.encode_session.run(None, {"images": images.float().cpu().numpy()})
        rows = {"live": None, "feats": feats, "keys": keys}

        def step(live, words, h, c):
            if rows["live"] is not live:  # some images finished: drop their features once
                index = live.numpy()
                rows.update(live=live, feats=feats[index], keys=keys[index])
            logp, h, c = self.step_session.run(None, {"feats": rows["feats"], "keys": rows["keys"],
                                                      "words": words.numpy(), "h": h.numpy(), "c": c.numpy()})
            return torch.from_numpy(logp), torch.from_numpy(h), torch.from_numpy(c)
        return Encoded(step, torch.from_numpy(h), torch.from_numpy(c), torch.from_numpy(logits),
                       torch.from_numpy(feats.mean(1)))


def load(encoder: nn.Module, decoder: nn.Module, version: str, cache: Path, threads: int,
         providers: list[str], search_options: dict) -> OnnxModel:
    """The model `version` in ONNX Runtime, from `cache` if a sound export is there, else exported
    now (and checked against torch: ExportError if they disagree)."""
    folder = cache / f"{version}-f{FORMAT}"
    problem = _unsound(folder, version)
    if problem is None:
        try:
            return OnnxModel(folder, threads, providers)
        except Exception as e:  # onnxruntime raises its own types for a file it cannot read
            problem = f"ONNX Runtime cannot load it ({e.__class__.__name__})"
    if folder.exists():
        log.warning("rebuilding the ONNX export in %s: %s", folder, problem)
    if next(encoder.parameters()).device.type != "cpu":  # exported and checked on the CPU, run anywhere
        encoder, decoder = copy.deepcopy(encoder).cpu(), copy.deepcopy(decoder).cpu()
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=cache))
    try:
        _export(encoder, decoder, staging)
        _write_manifest(staging, version)
        model = OnnxModel(staging, threads, providers)
        _check(model, encoder, decoder, search_options)
        _publish(staging, folder, version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model  # its sessions hold the graphs in memory: the files' move does not touch them


def _export(encoder: nn.Module, decoder: nn.Module, folder: Path) -> None:
    images = check_batch()[:2]
    with torch.no_grad():
        feats, keys, h, c, _ = _Encode(encoder, decoder).eval()(images)
    k = 3
    rows = (feats.shape[0] * k,)
    words = torch.zeros(rows, dtype=torch.long)
    image_dim, row_dim = torch.export.Dim("images"), torch.export.Dim("rows")
    graphs = [
        (_Encode(encoder, decoder), (images,), ["images"], ["feats", "keys", "h", "c", "logits"],
         ({0: image_dim},)),
        (_Step(decoder), (feats, keys, words, h.repeat_interleave(k, 0), c.repeat_interleave(k, 0)),
         ["feats", "keys", "words", "h", "c"], ["logp", "h_out", "c_out"],
         ({0: image_dim}, {0: image_dim}, {0: row_dim}, {0: row_dim}, {0: row_dim})),
    ]
    for name, (module, args, inputs, outputs, dynamic) in zip(FILES, graphs, strict=True):
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the exporter's notes on its own internals
                program = torch.onnx.export(module.eval(), args, dynamo=True, input_names=inputs,
                                            output_names=outputs, dynamic_shapes=dynamic, verbose=False)
            program.save(str(folder / name))
        except Exception as e:  # the exporter raises many types, all meaning "this model does not export"
            raise ExportError(f"the model does not export to ONNX ({name}): {e.__class__.__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e


def _check(model: OnnxModel, encoder: nn.Module, decoder: nn.Module, search_options: dict) -> None:
    """Both runtimes on the check batch: the same outputs within ATOL and the same captions."""
    from .beam_search import decoder_step
    images = check_batch()
    with torch.no_grad():
        feats, _, h, c, logits = _Encode(encoder, decoder).eval()(images)
        want = search(*decoder_step(decoder, feats), **search_options)
    step, oh, oc, ologits, _ = model.encode(images)
    diff = max(float((oh - h).abs().max()), float((oc - c).abs().max()), float((ologits - logits).abs().max()))
    got = search(step, oh, oc, **search_options)
    if diff > ATOL:
        raise ExportError(f"ONNX Runtime and torch differ by {diff:.2g} on the check batch (allowed {ATOL})")
    if [[x.tokens for x in hyps] for hyps in got] != [[x.tokens for x in hyps] for hyps in want]:
        raise ExportError("ONNX Runtime and torch caption the check batch differently")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_manifest(folder: Path, version: str) -> None:
    import onnxruntime as ort
    manifest = {"model_version": version, "format": FORMAT, "torch": torch.__version__,
                "onnxruntime": ort.__version__, "files": {name: _sha256(folder / name) for name in FILES}}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _unsound(folder: Path, version: str) -> str | None:
    """Why the export in `folder` must not be used, or None if it is sound."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except FileNotFoundError:
        return "no manifest"
    except (OSError, ValueError):
        return "unreadable manifest"
    if not isinstance(manifest, dict) or manifest.get("model_version") != version or manifest.get("format") != FORMAT:
        return "exported for another model version or format"
    files = manifest.get("files")
    for name in FILES:
        path = folder / name
        if not isinstance(files, dict) or not path.is_file() or _sha256(path) != files.get(name):
            return f"{name} is missing or does not match its manifest"
    return None


def _publish(staging: Path, folder: Path, version: str) -> None:
    """Move a checked export into place in one rename; a sound one another process put there first wins."""
    if folder.exists():
        if _unsound(folder, version) is None:
            return
        stale = folder.with_name(f".stale-{folder.name}-{os.getpid()}")
        folder.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        staging.rename(folder)
    except OSError:  # another process published between the check and the rename
        if _unsound(folder, version) is not None:
            raise
