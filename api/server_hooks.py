"""gunicorn's server hooks for `captioner serve` (loaded with `--config python:captioner.api.server_hooks`
only when `serve` made the metrics folder itself)."""
import os
import shutil
from typing import Any


def on_exit(_server: Any) -> None:
    """The master stops (SIGTERM, SIGINT, SIGQUIT): remove the multiprocess metrics folder that
    `captioner serve` made for this run, or every run leaves one in the temporary directory."""
    shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
