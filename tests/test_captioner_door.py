"""core/captioner.py is the only door to model/: it must agree with the model on versions."""
from captioner.core import captioner
from captioner.core.settings import Settings


def test_version_matches_the_model_without_loading_it(tmp_path):
    from captioner.model import inference

    path = tmp_path / "weights.pt"
    path.write_bytes(b"some checkpoint bytes" * 1000)
    assert captioner.version(Settings(model_path=str(path))) == inference.checkpoint_version(path)


def test_shipped_checkpoint_is_found_without_importing_the_model():
    from captioner.model import inference

    assert captioner.checkpoint_path(Settings()) == inference.DEFAULT_CHECKPOINT


def test_loaded_model_reports_the_version_jobs_are_submitted_for(checkpoint):
    settings = Settings(model_path=str(checkpoint), device="cpu")
    assert captioner.get(settings).version == captioner.version(settings)


def test_the_worker_parent_never_imports_torch():
    """The worker's main process forks the pool: torch (and CUDA) must first load in the children."""
    import subprocess
    import sys

    code = "import sys, captioner.worker.tasks; assert 'torch' not in sys.modules, 'torch imported before the fork'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_threads_asking_at_once_load_the_model_once(tiny_checkpoint, monkeypatch):
    """The first batch's I/O threads all preprocess at once: each used to load its own copy."""
    from concurrent.futures import ThreadPoolExecutor

    from captioner.model import inference

    loads = []
    real_load = inference.load

    def counted_load(*args, **kwargs):
        loads.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(inference, "load", counted_load)
    monkeypatch.setattr(captioner, "_loaded", None)
    settings = Settings(model_path=str(tiny_checkpoint), device="cpu")
    with ThreadPoolExecutor(8) as pool:
        models = list(pool.map(lambda _: captioner.get(settings), range(8)))
    assert len(loads) == 1 and all(m is models[0] for m in models)
