"""The README's hand deployment ("Distributed") as an operator runs it: each command of its shell
block, in order, as written, with the real PostgreSQL, Redis and SeaweedFS given through the
variables its `export` lines name; then an upload goes through it to a caption."""
import io
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from PIL import Image
from sqlalchemy import create_engine, text

from conftest import POSTGRES_URL, REPO

pytestmark = pytest.mark.integration  # starts the API and a worker

EXPORTED = {"CAPTIONER_DATABASE_URL", "CAPTIONER_BROKER_URL", "CAPTIONER_STORAGE", "AWS_ENDPOINT_URL_S3",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
LONG_LIVED = ("captioner serve", "captioner worker")
DEADLINE_S = 300  # a model load and one caption on a shared 2-core host


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runbook() -> list[str]:
    """The shell block that follows **Distributed** in the README, one command per line."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("**Distributed**"):]
    block = re.findall(r"```sh\n(.*?)```", section, re.S)[0]
    return [line for line in block.splitlines() if line.strip()]


def _exported(line: str) -> set[str]:
    return {word.split("=", 1)[0] for word in line.split()[1:] if "=" in word}


def test_the_runbook_exports_what_the_services_need():
    lines = runbook()
    exports = [line for line in lines if line.startswith("export ")]
    assert set().union(*map(_exported, exports)) == EXPORTED
    assert any(line.startswith("aws s3 mb s3://my-bucket") for line in lines)  # the upload bucket exists first
    assert "s3://my-bucket/" in " ".join(exports)


@pytest.fixture
def fresh_database():
    """An empty PostgreSQL database: `captioner db upgrade` in the runbook builds its schema."""
    base = urlsplit(POSTGRES_URL)
    name = f"captioner_runbook_{secrets.token_hex(4)}"
    admin = create_engine(urlunsplit(base._replace(scheme="postgresql+psycopg")), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield urlunsplit(base._replace(path=f"/{name}"))
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


def _http(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers or {}), timeout=5) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)
    except (urllib.error.URLError, ConnectionError, TimeoutError):  # not listening yet
        return 0, {}


def _wait(what: str, ready, procs: list[subprocess.Popen], logs: Path) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not ready():
        died = [p.args for p in procs if p.poll() is not None]
        tail = "".join(f.read_text()[-2000:] for f in sorted(logs.glob("*.log")))
        assert not died and time.monotonic() < deadline, f"{what}: {died} {tail}"
        time.sleep(0.5)


def _multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = secrets.token_hex(8)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_the_readme_deployment_runs_as_written(fresh_database, redis_url, s3, tiny_checkpoint, tmp_path):
    bucket, port = f"runbook-{secrets.token_hex(4)}", free_port()
    env = {**os.environ, **s3, "CAPTIONER_DATABASE_URL": fresh_database, "CAPTIONER_BROKER_URL": redis_url,
           "CAPTIONER_STORAGE": f"s3://{bucket}/uploads", "CAPTIONER_MODEL_PATH": str(tiny_checkpoint),
           # this interpreter's `captioner` and `celery` first, as in the venv an operator activates
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    base = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    outputs: list[str] = []
    try:
        for n, line in enumerate(runbook()):
            if line.startswith("export "):
                continue  # the services' real addresses are in env
            command = line.replace("my-bucket", bucket).replace("--port 8000", f"--port {port}")
            if command.startswith("aws ") and shutil.which("aws") is None:
                from captioner.core.storage import s3_client
                s3_client().create_bucket(Bucket=bucket)  # no AWS CLI on this host: boto3 does the same
                continue
            if command.startswith(LONG_LIVED):
                with open(tmp_path / f"{n}.log", "wb") as log:
                    procs.append(subprocess.Popen(["bash", "-c", f"exec {command}"], env=env, stdout=log,
                                                  stderr=subprocess.STDOUT))
                if command.startswith("captioner serve"):
                    _wait(command, lambda: _http(f"{base}/healthz")[0] == 200, procs, tmp_path)
                else:  # the worker counts once its heartbeat is in
                    _wait(command, lambda: _http(f"{base}/readyz")[1].get("queues", {}).get("interactive", {})
                          .get("workers") == 1, procs, tmp_path)
                continue
            done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, (command, done.stdout, done.stderr)
            outputs.append(done.stdout)

        status, ready = _http(f"{base}/readyz")
        assert status == 200 and ready["checks"]["workers"] == "ok: 1 live", ready
        # `keys create` prints the key alone on its last line of standard output
        key = next(line for out in outputs for line in out.splitlines() if line.startswith("cap_"))
        photo = io.BytesIO()
        Image.new("RGB", (64, 48), (200, 120, 40)).save(photo, "JPEG")
        body, kind = _multipart("file", "photo.jpg", photo.getvalue())
        status, job = _http(f"{base}/v1/images", body, {"Authorization": f"Bearer {key}", "Content-Type": kind})
        assert status == 202, job
        seen = lambda: _http(f"{base}/v1/images/{job['id']}", headers={"Authorization": f"Bearer {key}"})[1]  # noqa: E731
        _wait("a caption", lambda: seen().get("status") == "done", procs, tmp_path)
        assert any("interactive" in out and "live" in out for out in outputs)  # `captioner status`
        assert any("pong" in out for out in outputs)  # `celery -A ... inspect ping`
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
