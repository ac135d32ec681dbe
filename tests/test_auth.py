"""API keys, scopes, rate limits and secrets kept out of logs, through the real app and CLI."""
import io
import logging
import re
from dataclasses import replace

import pytest
from click.testing import CliRunner

from captioner.api import create_app
from conftest import keyed, make_key
from captioner.core.errors import ConfigError
from test_api import assert_error, jpeg

OPEN = ("/healthz", "/readyz", "/openapi.json", "/docs")


@pytest.fixture
def app(app_settings):
    return create_app(app_settings)


@pytest.fixture
def cli_env(app_settings, monkeypatch):
    from captioner.core.settings import get_settings

    monkeypatch.setenv("CAPTIONER_DATABASE_URL", app_settings.database_url)
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


def test_keys_cli_creates_lists_and_revokes(app, cli_env):
    from captioner.cli import cli

    created = cli_env.invoke(cli, ["keys", "create", "--tenant", "acme", "--scope", "read", "--name", "ci"])
    assert created.exit_code == 0, created.output
    key = created.output.strip().splitlines()[-1].split()[-1]  # the contract: last word of the last line
    assert re.fullmatch(r"cap_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", key)
    client = keyed(app, key)
    assert client.get("/v1/search?q=dog").status_code == 200

    listed = cli_env.invoke(cli, ["keys", "list"])
    assert listed.exit_code == 0 and key not in listed.output  # only the public prefix is shown
    assert f"acme  {key[:17]}...  read  active" in listed.output and "ci" in listed.output
    key_id = re.search(r"key (\d+) for tenant acme", created.output).group(1)
    revoked = cli_env.invoke(cli, ["keys", "revoke", key_id])
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    assert_error(client.get("/v1/search?q=dog"), 401, "revoked_api_key")
    assert "revoked" in cli_env.invoke(cli, ["keys", "list", "--tenant", "acme"]).output
    assert cli_env.invoke(cli, ["keys", "revoke", "999"]).exit_code == 1
    bad = cli_env.invoke(cli, ["keys", "create", "--tenant", "No Spaces"])
    assert bad.exit_code == 1 and "tenant names" in bad.output


def test_a_missing_or_wrong_key_is_a_401_that_asks_for_a_bearer_token(app, api_key):
    prefix = api_key[:17]
    cases = [({}, "missing_api_key"), ({"Authorization": f"Basic {api_key}"}, "invalid_api_key"),
             ({"Authorization": "Bearer"}, "invalid_api_key"), ({"Authorization": "Bearer nonsense"}, "invalid_api_key"),
             ({"Authorization": f"Bearer {prefix}{'A' * 43}"}, "invalid_api_key"),  # right prefix, wrong secret
             ({"Authorization": f"Bearer {api_key}x"}, "invalid_api_key")]
    client = app.test_client()
    for headers, code in cases:
        for method, path in (("GET", "/v1/images/1"), ("POST", "/v1/batches"), ("GET", "/v1/no-such-route")):
            r = client.open(path, method=method, headers=headers)
            assert_error(r, 401, code)
            assert r.headers["WWW-Authenticate"].startswith('Bearer realm="captioner"')
    assert client.get("/v1/search?q=dog", headers={"Authorization": f"bearer {api_key}"}).status_code == 200


def test_probes_and_documentation_need_no_key(app):
    client = app.test_client()
    for path in OPEN:
        assert client.get(path).status_code == 200, path


def test_every_route_declares_its_scope(app):
    """GET routes read, the others write; only the probes and the documentation are open."""
    from captioner.api.auth import OPEN as open_endpoints

    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        if rule.endpoint in open_endpoints:
            assert not rule.rule.startswith("/v1/"), rule.rule
            continue
        scope = getattr(app.view_functions[rule.endpoint], "required_scope", None)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            given = scope.get(method) if isinstance(scope, dict) else scope
            assert given == ("read" if method == "GET" else "write"), (rule, method)


def test_scopes_include_the_ones_below(app_settings):
    app = create_app(app_settings)
    upload = {"file": (io.BytesIO(jpeg()), "a.jpg")}
    reader = keyed(app, make_key(app_settings.database_url, scope="read"))
    assert reader.get("/v1/search?q=dog").status_code == 200
    body = assert_error(reader.post("/v1/images", data=upload), 403, "insufficient_scope")
    assert "write" in body["error"]["message"]
    for scope in ("write", "admin"):
        client = keyed(app, make_key(app_settings.database_url, scope=scope))
        r = client.post("/v1/images", data={"file": (io.BytesIO(jpeg()), "a.jpg")})
        assert r.status_code in (200, 202), r.get_json()
        assert client.get(r.headers["Location"]).status_code == 200


def test_a_route_without_a_scope_is_closed_to_all_but_admin(app_settings):
    from captioner.api.auth import require_scope

    app = create_app(app_settings)
    app.add_url_rule("/v1/forgotten", "forgotten", lambda: {"secret": 1})
    app.add_url_rule("/v1/marked", "marked", require_scope("read")(lambda: {"ok": 1}))
    writer = keyed(app, make_key(app_settings.database_url, scope="write"))
    assert_error(writer.get("/v1/forgotten"), 403, "insufficient_scope")
    assert writer.get("/v1/marked").status_code == 200
    assert keyed(app, make_key(app_settings.database_url, scope="admin")).get("/v1/forgotten").status_code == 200
    with pytest.raises(ValueError):
        require_scope("root")


def test_last_use_is_recorded_once_a_minute(app, app_settings, api_key):
    from datetime import timedelta

    from sqlalchemy import select, update

    from captioner.core.db import make_engine
    from captioner.core.tables import ApiKey

    client = keyed(app, api_key)
    engine = make_engine(app_settings.database_url)
    row = ApiKey.prefix == api_key[4:16]

    def stamp():
        with engine.connect() as conn:
            return conn.scalar(select(ApiKey.last_used_at).where(row))

    assert stamp() is None
    client.get("/v1/search?q=dog")
    first = stamp()
    assert first is not None
    client.get("/v1/search?q=dog")
    assert stamp() == first  # within a minute: no write
    with engine.begin() as conn:
        conn.execute(update(ApiKey).where(row).values(last_used_at=first - timedelta(minutes=2)))
    client.get("/v1/search?q=dog")
    assert stamp() > first
    engine.dispose()


def test_auth_off_is_one_user_with_every_scope(app_settings):
    client = create_app(replace(app_settings, auth="off")).test_client()
    r = client.post("/v1/images", data={"file": (io.BytesIO(jpeg()), "a.jpg")})
    assert r.status_code == 202
    assert client.get(r.headers["Location"]).status_code == 200
    # what tenant "default" submitted without keys is the same tenant's with a key
    keyed_client = keyed(create_app(app_settings), make_key(app_settings.database_url, tenant="default"))
    assert keyed_client.get(r.headers["Location"]).status_code == 200
    other = keyed(create_app(app_settings), make_key(app_settings.database_url, tenant="other"))
    assert_error(other.get(r.headers["Location"]), 404, "not_found")


def test_settings_refuse_unknown_auth_modes_and_malformed_limits(app_settings):
    from captioner.core.settings import load_settings

    assert load_settings({"CAPTIONER_AUTH": "off"}).auth == "off"
    with pytest.raises(ConfigError, match="CAPTIONER_AUTH"):
        load_settings({"CAPTIONER_AUTH": "maybe"})
    with pytest.raises(ConfigError, match="CAPTIONER_RATE_LIMIT"):
        create_app(replace(app_settings, rate_limit="lots"))


def test_rate_limits_count_per_key_in_redis(app_settings, redis_url):
    import redis

    app = create_app(replace(app_settings, rate_limit="3/minute", ratelimit_storage_url=redis_url))
    first, second = (make_key(app_settings.database_url) for _ in range(2))
    client = keyed(app, first)
    for _ in range(3):
        assert client.get("/v1/search?q=dog").status_code == 200
    r = client.get("/v1/search?q=dog")
    body = assert_error(r, 429, "rate_limited")
    retry = int(r.headers["Retry-After"])  # the window's end, in whole seconds rounded up
    assert 1 <= retry <= 61 and f"retry in {retry} s" in body["error"]["message"]
    assert_error(client.post("/v1/images", data={"file": (io.BytesIO(jpeg()), "a.jpg")}), 429, "rate_limited")
    assert keyed(app, second).get("/v1/search?q=dog").status_code == 200  # another key has its own count
    for _ in range(5):
        assert client.get("/healthz").status_code == 200  # probes are never limited
    # the counts live in Redis (shared by every API process), under the key's public prefix only
    stored = [k.decode() for k in redis.Redis.from_url(redis_url).scan_iter(f"*captioner*{first[4:16]}*")]
    assert stored and not any(first in k for k in stored)
    redis.Redis.from_url(redis_url).delete(*stored)


def test_rate_limits_fall_back_to_memory_when_redis_is_down(app_settings, api_key):
    import socket

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening
    try:
        app = create_app(replace(app_settings, rate_limit="2/minute",
                                 ratelimit_storage_url=f"redis://127.0.0.1:{closed.getsockname()[1]}/3"))
        client = keyed(app, api_key)
        statuses = [client.get("/v1/search?q=dog").status_code for _ in range(4)]
    finally:
        closed.close()
    assert statuses[0] == 200 and statuses[-1] == 429  # still served, still limited


def test_keys_never_reach_the_logs(app_settings, caplog):
    """Every logger at DEBUG (SQLAlchemy's statements and parameters included) while keys are used,
    refused, revoked and while a handler fails with a traceback."""
    from captioner.core import auth
    from captioner.core.db import make_engine, make_sessionmaker

    app = create_app(app_settings)

    def boom():
        raise RuntimeError("the handler failed")

    from captioner.api.auth import require_scope
    app.add_url_rule("/v1/boom", "boom", require_scope("read")(boom))
    key, revoked = make_key(app_settings.database_url), make_key(app_settings.database_url)
    engine = make_engine(app_settings.database_url)
    with make_sessionmaker(engine).begin() as s:
        auth.revoke_key(s, auth.authenticate(s, revoked).key_id)
    engine.dispose()
    caplog.set_level(logging.DEBUG)
    logging.getLogger("sqlalchemy.engine").setLevel(logging.DEBUG)
    try:
        client = keyed(app, key)
        assert client.get("/v1/search?q=dog").status_code == 200
        assert client.post("/v1/images", data={"file": (io.BytesIO(jpeg()), "a.jpg")}).status_code == 202
        assert client.get("/v1/boom").status_code == 500
        assert keyed(app, revoked).get("/v1/images/1").status_code == 401
        assert keyed(app, key[:-1] + "x").get("/v1/images/1").status_code == 401
    finally:
        logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)
    text = caplog.text
    assert "the handler failed" in text and "SELECT" in text  # the logs were captured
    for secret in (key, revoked, key[17:], revoked[17:]):
        assert secret not in text


def test_failed_authentication_is_rate_limited_per_client_address(app_settings, api_key):
    """Wrong keys (API or sign-in form) from one address meet 429 past the limit; a missing key is
    not a guess; other addresses and their right keys go on."""
    from conftest import csrf_token

    app = create_app(replace(app_settings, auth_failure_limit="3/minute"))
    guesser = keyed(app, "cap_wrongprefix_" + "x" * 43)
    guesser.environ_base["REMOTE_ADDR"] = "203.0.113.7"
    bare = app.test_client()
    bare.environ_base["REMOTE_ADDR"] = "203.0.113.7"
    for _ in range(5):
        assert_error(bare.get("/v1/batches/1"), 401, "missing_api_key")
    for _ in range(3):
        assert_error(guesser.get("/v1/batches/1"), 401, "invalid_api_key")
    r = guesser.get("/v1/batches/1")
    body = assert_error(r, 429, "rate_limited")
    assert "failed authentications" in body["error"]["message"] and int(r.headers["Retry-After"]) >= 1
    guesser.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {api_key}"  # even the right key, from there
    assert guesser.get("/v1/batches/1").status_code == 429
    other = keyed(app, api_key)
    other.environ_base["REMOTE_ADDR"] = "198.51.100.2"
    assert_error(other.get("/v1/batches/1"), 404, "not_found")

    browser = app.test_client()
    browser.environ_base["REMOTE_ADDR"] = "198.51.100.9"
    for status in (401, 401, 401, 429):
        r = browser.post("/sign-in", data={"key": "cap_nope", "csrf_token": csrf_token(browser)})
        assert r.status_code == status


def test_a_malformed_auth_failure_limit_is_refused(app_settings):
    with pytest.raises(ConfigError, match="CAPTIONER_AUTH_FAILURE_LIMIT"):
        create_app(replace(app_settings, auth_failure_limit="lots"))
