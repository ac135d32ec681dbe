"""The ONNX Runtime path: the same captions as torch, an export cache that is never used when it is
stale or corrupt, and the fallbacks when ONNX Runtime cannot run a model."""
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from captioner.cli import cli
from captioner.core.errors import ConfigError
from captioner.core.settings import Settings
from captioner.model import inference, onnx_runtime


@pytest.fixture(scope="module")
def shipped_pair(tmp_path_factory, checkpoint):
    """The shipped model in both runtimes, its export in a cache of this module's own. torch in
    float32, the reference: bf16, where the CPU has it, is an approximation of its own."""
    cache = tmp_path_factory.mktemp("onnx")
    return (inference.load(checkpoint, device="cpu", bf16=False, runtime="torch"),
            inference.load(checkpoint, device="cpu", runtime="onnx", onnx_cache=cache), cache)


def test_both_runtimes_caption_real_photos_alike(shipped_pair, photos):
    torch_model, onnx_model, _ = shipped_pair
    assert (torch_model.runtime, onnx_model.runtime) == ("torch", "onnx")
    batch = torch.stack([torch_model.preprocess(Image.open(p)) for p in photos[:48]])
    want, got = torch_model.caption(batch), onnx_model.caption(batch)
    same = sum(w.text == g.text for w, g in zip(want, got, strict=True))
    assert same >= 47, [(w.text, g.text) for w, g in zip(want, got) if w.text != g.text]
    for w, g in zip(want, got):
        if w.text == g.text:
            assert g.confidence == pytest.approx(w.confidence, abs=1e-3)
            assert [t for t, _ in g.tags] == [t for t, _ in w.tags]


def test_the_export_is_cached_and_reused_without_exporting_again(shipped_pair, checkpoint, monkeypatch):
    _, onnx_model, cache = shipped_pair
    folder = cache / f"{onnx_model.version}-f{onnx_runtime.FORMAT}"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model_version"] == onnx_model.version and set(manifest["files"]) == set(onnx_runtime.FILES)

    def no_export(*args):
        raise AssertionError("exported again although a sound export was cached")
    monkeypatch.setattr(onnx_runtime, "_export", no_export)
    again = inference.load(checkpoint, device="cpu", runtime="onnx", onnx_cache=cache)
    assert again.runtime == "onnx"
    assert [f.name for f in cache.iterdir() if f.name.startswith(".")] == []  # no staging folder left


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tiny_checkpoint):
    cache = tmp_path_factory.mktemp("tiny-onnx")
    model = inference.load(tiny_checkpoint, device="cpu", runtime="onnx", onnx_cache=cache)
    return cache, cache / f"{model.version}-f{onnx_runtime.FORMAT}"


def _reload(tiny_checkpoint, cache, caplog) -> inference.Captioner:
    with caplog.at_level(logging.WARNING, logger=onnx_runtime.__name__):
        model = inference.load(tiny_checkpoint, device="cpu", runtime="onnx", onnx_cache=cache)
    assert model.runtime == "onnx"
    return model


@pytest.mark.parametrize("damage", ["truncated graph", "flipped byte", "no manifest", "stale manifest"])
def test_a_corrupt_or_stale_export_is_rebuilt_never_used(tiny_export, tiny_checkpoint, damage, caplog):
    cache, folder = tiny_export
    step = folder / "step.onnx"
    if damage == "truncated graph":
        step.write_bytes(step.read_bytes()[:1000])
    elif damage == "flipped byte":
        data = bytearray(step.read_bytes())
        data[len(data) // 2] ^= 0xFF  # a weight changes: the file still loads, and would caption wrongly
        step.write_bytes(bytes(data))
    elif damage == "no manifest":
        (folder / "manifest.json").unlink()
    else:
        manifest = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**manifest, "format": onnx_runtime.FORMAT - 1}))
    _reload(tiny_checkpoint, cache, caplog)
    assert "rebuilding the ONNX export" in caplog.text
    assert onnx_runtime._unsound(folder, folder.name.split("-")[0]) is None
    caplog.clear()
    _reload(tiny_checkpoint, cache, caplog)
    assert "rebuilding" not in caplog.text


def test_auto_falls_back_to_torch_with_one_warning_where_onnxruntime_is_missing(tiny_checkpoint, tmp_path,
                                                                              monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets where it is not installed
    with caplog.at_level(logging.WARNING):
        model = inference.load(tiny_checkpoint, device="cpu", runtime="auto", onnx_cache=tmp_path)
    assert model.runtime == "torch"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "quality estimator" not in r.getMessage()]
    assert len(warnings) == 1 and "onnxruntime" in warnings[0].getMessage()
    with pytest.raises(inference.RuntimeUnavailable, match="onnxruntime package is not installed"):
        inference.load(tiny_checkpoint, device="cpu", runtime="onnx", onnx_cache=tmp_path)
    settings = Settings(model_path=str(tiny_checkpoint), device="cpu", runtime="onnx", onnx_cache=str(tmp_path))
    from captioner.core import captioner
    with pytest.raises(ConfigError, match="onnxruntime"):
        captioner.load(settings, tiny_checkpoint)


def _fails_to_export(self, feats, keys, words, h, c):
    """A step whose control flow depends on the data: torch.export cannot trace it."""
    logits, h, c, _ = self.decoder.step(feats, keys, words, h, c)
    if float(h.sum()) > 0:
        h = h * 1.0
    return logits.log_softmax(-1), h, c


@pytest.mark.parametrize("fault", ["does not export", "disagrees with torch"])
def test_a_model_onnx_runtime_cannot_run_falls_back_or_fails_clearly(tiny_checkpoint, tmp_path, monkeypatch,
                                                                     caplog, fault):
    if fault == "does not export":
        monkeypatch.setattr(onnx_runtime._Step, "forward", _fails_to_export)
        message = "does not export to ONNX"
    else:
        monkeypatch.setattr(onnx_runtime, "ATOL", -1.0)  # any difference at all is too much
        message = "differ"
    with pytest.raises(inference.RuntimeUnavailable, match=message):
        inference.load(tiny_checkpoint, device="cpu", runtime="onnx", onnx_cache=tmp_path)
    with caplog.at_level(logging.WARNING):
        model = inference.load(tiny_checkpoint, device="cpu", runtime="auto", onnx_cache=tmp_path)
    assert model.runtime == "torch" and message in caplog.text
    assert model.caption(torch.zeros(1, 3, 224, 224))[0].text  # torch still captions
    assert list(tmp_path.iterdir()) == []  # nothing unchecked was published, no staging left


def test_an_unknown_runtime_is_refused_by_the_settings():
    with pytest.raises(ConfigError, match="CAPTIONER_RUNTIME must be one of auto, torch, onnx"):
        Settings(runtime="tensorrt")


def test_describe_and_bench_model_take_a_runtime(tiny_checkpoint, photos):
    runner = CliRunner()
    for runtime in ("torch", "onnx"):
        result = runner.invoke(cli, ["describe", "--checkpoint", str(tiny_checkpoint), "--runtime", runtime, "--json",
                                     str(photos[0])])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output.splitlines()[-1])["text"]
    result = runner.invoke(cli, ["bench", "model", "--checkpoint", str(tiny_checkpoint), "--images",
                                 str(Path(photos[0]).parent), "--batch-sizes", "2,4", "--runtime", "torch,onnx"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output.splitlines()[-1])
    # torch at bf16 where this CPU has it, and then also at fp32, as on a CPU without
    torch_rows = [("torch", "bf16"), ("torch", "fp32")] if inference.bf16_supported(torch.device("cpu")) else [("torch", "fp32")]
    assert [(r["runtime"], r["precision"], r["batch"]) for r in rows] == [
        (*runtime, batch) for batch in (2, 4) for runtime in [*torch_rows, ("onnx", "fp32")]]
    assert all(r["encoder_img_s"] > 0 and r["search_img_s"] > 0 and r["captions_img_s"] > 0 for r in rows)
    result = runner.invoke(cli, ["bench", "model", "--runtime", "torch,tensorrt"])
    assert result.exit_code == 2 and "runtimes are auto, torch, onnx" in result.output
