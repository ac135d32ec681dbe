"""One typed settings object, read from CAPTIONER_* environment variables in one place.

S3 credentials and endpoint are deliberately not here: boto3 reads the standard AWS variables
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), so any
S3-compatible store works without our code knowing about it.
"""
import os
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Mapping, get_args

from .errors import ConfigError

PREFIX = "CAPTIONER_"
AUTH_MODES = ("required", "off")
LOG_FORMATS = ("text", "json")
JPEG_DECODERS = ("auto", "device", "pillow")
S3_SNIFF = ("every", "unnamed")
PRECISIONS = {"auto": None, "bf16": True, "fp32": False}  # -> model.inference's bf16 argument
RUNTIMES = ("auto", "torch", "onnx")  # model.inference.RUNTIMES, checked here without importing torch
MIN_SECRET_CHARS = 32  # token_urlsafe(32) is 43: a short, guessable key would let anyone forge a session
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Settings:
    database_url: str = "sqlite:///captioner.db"  # a file in the working directory: the embedded default
    broker_url: str | None = None  # unset = embedded mode: `captioner caption` works in-process
    storage: str = "./captioner-data"  # uploads go here: a local folder or s3://bucket[/prefix]
    batch_size: int | None = None  # images a worker claims and writes at once; None = 256 on a GPU host, 64 on a CPU
    # images per model forward inside a batch; None = the whole batch on a GPU, 32 on a CPU, half a
    # CPU batch: the next forward's images are fetched and decoded while the current one runs
    forward_size: int | None = None
    batch_wait_ms: int = 500  # a worker flushes a partial batch after this long
    device: str | None = None  # torch device; None = CUDA when present, else CPU
    # the encoder's arithmetic: "bf16" (autocast), "fp32", or "auto" = bf16 where the device has bf16
    # units (CUDA Ampere+, AVX512-BF16/AMX CPUs); the decoder and beam search always run in fp32
    precision: str = "auto"
    # what runs the model: "onnx" (ONNX Runtime, exported from the checkpoint on first use), "torch",
    # or "auto" = ONNX Runtime on a CPU, torch on a GPU, torch with a warning where ONNX Runtime fails
    runtime: str = "auto"
    onnx_cache: str | None = None  # where ONNX exports are kept; None = $XDG_CACHE_HOME/captioner/onnx
    # "device": baseline JPEGs are decoded on the model's device (nvJPEG on a GPU, a batch at a
    # time, before each forward); "pillow": on the I/O threads, draft mode; "auto": device on CUDA
    jpeg_decode: str = "auto"
    # a folder holding flickr8k/ and imagenet-samples/: where `captioner train`, `baseline` and
    # `bench` look for data when no option names it; None = those options are required
    data_dir: str | None = None
    model_path: str | None = None  # checkpoint file; None = the shipped model/checkpoints/default.pt
    beam: int = 3  # beam width for decoding
    # the share of captions published without review that may be wrong: the model's quality
    # estimator turns it into a threshold (its dev split's risk-coverage curve, in the checkpoint)
    review_risk: float = 0.10
    n_best: int = 3  # candidates kept per image
    max_upload_bytes: int = 25 * 1024 * 1024  # larger uploads get 413
    # larger JSON bodies get 413: a parsed body costs many times its size (a 5 MiB one cost 120 MB)
    max_json_bytes: int = 1024 * 1024
    max_pixels: int = 64_000_000  # decoded width x height above this is refused (decompression bombs)
    lease_seconds: int = 600  # a claimed job returns to the queue if not finished within this
    max_attempts: int = 3  # claims before a job is failed for good (a poison image must not loop)
    requeue_after_seconds: int = 300  # the sweep re-publishes jobs queued longer than this
    sweep_seconds: int = 60  # how often a worker's beat runs the sweep
    io_threads: int = 8  # concurrent fetch + decode threads per batch
    s3_prefix_limit: int = 100_000  # most keys one `s3://bucket/prefix` batch may expand to
    # which objects under an S3 prefix have their first bytes read to tell images from other files:
    # "every" object; "unnamed": only those without an image suffix (.jpg, .png ...), which are
    # taken on their name (2.7x the keys/s; a text file named .jpg then fails in the worker instead)
    s3_sniff: str = "every"
    # "required": every /v1 request needs an API key (`captioner keys create`); "off": a single-user
    # laptop, where every request is tenant "default" with every scope and may read any bucket
    auth: str = "required"
    rate_limit: str = "600/minute"  # per API key (per client address with auth off); flask-limiter syntax
    # wrong API keys (or sign-in keys) per client address; beyond it that address gets 429 for any key
    auth_failure_limit: str = "20/minute"
    ratelimit_storage_url: str | None = None  # None = the broker if it is Redis, else per-process memory
    webhook_secret: str | None = None  # HMAC-SHA256 key for callback events; unset = callback_url refused
    # hosts or addresses a callback may reach although they are private/loopback, e.g. "127.0.0.1,localhost"
    webhook_allow: str = ""
    webhook_timeout_seconds: int = 10  # one delivery attempt's wall-clock limit: connect + send + answer
    webhook_max_attempts: int = 6  # deliveries of one event before it is given up (backoff 2, 4, 8 ... s)
    log_format: str = "text"  # "json": one JSON object per line, with image, job and batch ids
    flower_basic_auth: str | None = None  # "user:pass" for `captioner flower`; required unless on 127.0.0.1
    metrics_token: str | None = None  # bearer token for the API's /metrics; unset = /metrics not served
    worker_metrics_port: int | None = None  # the worker's Prometheus port; unset = no metrics server
    # the address the worker's metrics server listens on: loopback unless a scraper on another host
    # needs it (0.0.0.0 = every interface; the worker's metrics carry no token)
    worker_metrics_host: str = "127.0.0.1"
    # a worker whose last heartbeat is older than this is gone (killed, or its host lost): /readyz and
    # /metrics stop counting it. Workers beat every quarter of it; one stopped cleanly leaves at once
    worker_timeout_seconds: int = 20
    # signs the web interface's session cookies and CSRF tokens; unset = a random one made once and
    # kept in the database, so every API process of a fleet, and a restarted one, shares it
    secret_key: str | None = None
    # test-only: a worker that reads the image with this sha256 dies at once (os._exit), as one
    # killed by a poison image would; the fault suite's poison-image case
    crash_on_sha256: str | None = None
    session_cookie_secure: bool = False  # web sessions over HTTPS only: set it where TLS ends in front of the API

    def __post_init__(self) -> None:
        if self.auth not in AUTH_MODES:
            raise ConfigError(f"{PREFIX}AUTH must be one of {', '.join(AUTH_MODES)}, got {self.auth!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"{PREFIX}PRECISION must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"{PREFIX}RUNTIME must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.jpeg_decode not in JPEG_DECODERS:
            raise ConfigError(f"{PREFIX}JPEG_DECODE must be one of {', '.join(JPEG_DECODERS)}, got {self.jpeg_decode!r}")
        if self.s3_sniff not in S3_SNIFF:
            raise ConfigError(f"{PREFIX}S3_SNIFF must be one of {', '.join(S3_SNIFF)}, got {self.s3_sniff!r}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"{PREFIX}LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        if not 0 < self.review_risk < 1:
            raise ConfigError(f"{PREFIX}REVIEW_RISK must be a share between 0 and 1, e.g. 0.10, got {self.review_risk!r}")
        if self.flower_basic_auth is not None:
            _check_flower_auth(self.flower_basic_auth)
        if self.secret_key is not None and len(self.secret_key) < MIN_SECRET_CHARS:
            raise ConfigError(f"{PREFIX}SECRET_KEY must be at least {MIN_SECRET_CHARS} characters, e.g. the output of "
                              "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")

    @property
    def embedded(self) -> bool:
        return self.broker_url is None


def _check_flower_auth(value: str) -> None:
    """Flower splits its basic-auth setting at commas into several user:password pairs, so
    `admin:Sup3r,secret` would let `secret` sign in alone; an empty part is a guessable one."""
    user, colon, password = value.partition(":")
    if not colon or not user or not password:
        raise ConfigError(f"{PREFIX}FLOWER_BASIC_AUTH must be user:password, neither of them empty")
    if "," in value:
        raise ConfigError(f"{PREFIX}FLOWER_BASIC_AUTH may not contain a comma: Flower reads each comma-separated "
                          "part as another user:password pair")


def _convert(name: str, raw: str, kind: type) -> object:
    if kind is bool:
        if raw.lower() not in TRUE + FALSE:
            raise ConfigError(f"{PREFIX}{name.upper()} must be one of {', '.join(TRUE + FALSE)}, got {raw!r}")
        return raw.lower() in TRUE
    if kind is int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{PREFIX}{name.upper()} must be an integer, got {raw!r}") from None
        if value <= 0:
            raise ConfigError(f"{PREFIX}{name.upper()} must be positive, got {value}")
        return value
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{PREFIX}{name.upper()} must be a number, got {raw!r}") from None
    return raw


def load_settings(env: Mapping[str, str]) -> Settings:
    """Settings from an environment mapping; unknown CAPTIONER_* names are errors (typos fail early)."""
    known = {f.name: f for f in fields(Settings)}
    values: dict[str, object] = {}
    for key, raw in env.items():
        if not key.startswith(PREFIX):
            continue
        name = key[len(PREFIX):].lower()
        if name not in known:
            # CAPTIONER_TEST_* variables configure the test suite, not the service
            if name.startswith("test_"):
                continue
            raise ConfigError(f"unknown setting {key}; known: {', '.join(PREFIX + n.upper() for n in known)}")
        if raw == "":
            continue  # an empty variable means "use the default", as in most twelve-factor setups
        types = (known[name].type, *get_args(known[name].type))
        kind = bool if bool in types else int if int in types else float if float in types else str
        values[name] = _convert(name, raw, kind)
    return Settings(**values)  # type: ignore[arg-type]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once: the only place that reads os.environ."""
    return load_settings(os.environ)
