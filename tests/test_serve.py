"""`captioner serve` as an operator runs it: gunicorn in front of create_app()."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.integration  # starts gunicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(sqlite_url, tmp_path, fake_checkpoint) -> tuple[subprocess.Popen, int, dict[str, str]]:
    """`captioner serve` started, answering /healthz; its temporary files go to tmp_path/tmp."""
    port = free_port()
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "CAPTIONER_DATABASE_URL": sqlite_url, "CAPTIONER_STORAGE": str(tmp_path / "store"),
           "CAPTIONER_MODEL_PATH": str(fake_checkpoint), "TMPDIR": str(tmp_path / "tmp")}
    env.pop("CAPTIONER_BROKER_URL", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "captioner.cli", "serve", "--port", str(port), "--workers", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                assert json.load(r) == {"status": "ok"}
            return proc, port, env
        except (urllib.error.URLError, ConnectionError, TimeoutError):  # TimeoutError: the worker still booting
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
            time.sleep(0.3)


def test_serve_answers_health_and_json_errors(sqlite_url, tmp_path, fake_checkpoint):
    proc, port, env = _serve(sqlite_url, tmp_path, fake_checkpoint)
    try:
        created = subprocess.run([sys.executable, "-m", "captioner.cli", "keys", "create", "--tenant", "default"], env=env,
                                 capture_output=True, text=True, check=True)
        key = created.stdout.strip().splitlines()[-1].split()[-1]
        for headers, status, code in (({}, 401, "missing_api_key"), ({"Authorization": f"Bearer {key}"}, 404, "not_found")):
            try:
                urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/images/77", headers=headers),
                                       timeout=5)
            except urllib.error.HTTPError as e:
                assert e.code == status and json.load(e)["error"]["code"] == code
            else:
                raise AssertionError(f"expected a {status}")
        assert [p.name[:22] for p in (tmp_path / "tmp").iterdir()] == ["captioner-api-metrics-"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log = proc.stdout.read().decode()
    assert "/v1/images/77" in log  # gunicorn's access log: it lists the request, never its key
    assert key not in log and key[17:] not in log
    assert list((tmp_path / "tmp").iterdir()) == []  # the metrics folder goes with the server


def test_serve_removes_its_metrics_folder_when_interrupted(sqlite_url, tmp_path, fake_checkpoint):
    proc, _, _ = _serve(sqlite_url, tmp_path, fake_checkpoint)
    assert len(list((tmp_path / "tmp").iterdir())) == 1
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert proc.wait(timeout=30) == 0, proc.stdout.read().decode()
    assert list((tmp_path / "tmp").iterdir()) == []
