"""Callback events against a real HTTP receiver on loopback (http.server in a thread): signed,
retried, every attempt recorded; callback URLs that reach private addresses are refused."""
import hashlib
import hmac
import io
import json
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select
from conftest import keyed, make_key  # siblings: tests/ is on sys.path
from test_api import assert_error, jpeg

from captioner.api import create_app
from captioner.core import captioner, jobs, webhooks
from captioner.core.db import make_engine, make_sessionmaker
from captioner.core.errors import InvalidRequest
from captioner.core.settings import Settings
from captioner.core.tables import WebhookDelivery

SECRET = "s3cret-for-tests"
TOLERANCE_S = 300


def verify(secret: str, headers, body: bytes) -> dict:
    """The receiver's side, as docs/http-api.md shows it."""
    timestamp = headers["X-Captioner-Timestamp"]
    if abs(time.time() - int(timestamp)) > TOLERANCE_S:
        raise ValueError("stale event")
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(headers["X-Captioner-Signature"], f"sha256={expected}"):
        raise ValueError("bad signature")
    return json.loads(body)


class Receiver:
    """A local HTTP server that records what it is sent and answers the statuses it is told to."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict, bytes]] = []
        self.statuses: list[int] = []  # answered in order, then 200
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((self.path, dict(self.headers), body))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def settings(sqlite_url, tmp_path, checkpoint) -> Settings:
    return Settings(database_url=sqlite_url, storage=str(tmp_path / "store"), model_path=str(checkpoint),
                    batch_size=4, webhook_secret=SECRET, webhook_allow="127.0.0.1,localhost")


def test_embedded_run_posts_signed_events_and_retries(settings, receiver, photos, tmp_path):
    sm = make_sessionmaker(make_engine(settings.database_url))
    version = captioner.version(settings)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff\xe0 not really a photo")
    single = f"{receiver.url}/single?x=1"
    jobs.submit_images(sm, [jobs.file_image(photos[0])], version, "interactive", lambda _: None,
                       callback_url=single)
    batch_id, _ = jobs.submit_images(sm, [jobs.file_image(photos[1]), jobs.file_image(junk)], version, "backfill",
                                     lambda _: None, batch_source="two", callback_url=f"{receiver.url}/batch")
    receiver.statuses = [500]  # the first attempt fails; the retry succeeds
    jobs.run_embedded(sm, settings, version, None, lambda report: None)

    events = {}
    for path, headers, body in receiver.received:
        event = verify(SECRET, headers, body)
        assert headers["X-Captioner-Event"] == event["type"] and headers["X-Captioner-Event-Id"] == event["id"]
        events.setdefault((path, event["type"]), []).append(event)
    assert sorted(events) == [("/batch", "image.done"), ("/batch", "image.failed"), ("/single?x=1", "image.done")]
    assert len(receiver.received) == 4  # one event was sent twice: the 500, then the retry
    done = events[("/single?x=1", "image.done")][0]["data"]
    assert done["caption"] and done["alt_text"] and done["alt_text_state"] in ("generated", "needs_review"), done
    failed = events[("/batch", "image.failed")][0]["data"]
    assert failed["error"]["code"] == "invalid_image" and failed["caption"] is None

    with sm() as s:
        rows = s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)).all()
    assert len(rows) == 4 and len({r.event_id for r in rows}) == 3
    retried = [r for r in rows if r.attempt == 2]
    assert len(retried) == 1 and retried[0].status_code == 200
    first = next(r for r in rows if r.event_id == retried[0].event_id and r.attempt == 1)
    assert (first.status_code, first.error) == (500, "HTTP 500")
    # the same secret verifies nothing else
    path, headers, body = receiver.received[0]
    with pytest.raises(ValueError, match="bad signature"):
        verify(SECRET, headers, body + b" ")


def test_delivery_checks_the_address_again(settings, receiver, sqlite_url, photos):
    """A name that passed at submission is resolved and checked again at delivery (DNS rebinding):
    here the allow-list no longer names it, so nothing is sent and the refusal is recorded."""
    sm = make_sessionmaker(make_engine(sqlite_url))
    with sm.begin() as s:
        s.execute(WebhookDelivery.__table__.delete())
    event = webhooks.Event("evt_1", "image.done", None, f"http://localhost:{receiver.server.server_port}/x", b"{}")
    strict = replace(settings, webhook_allow="")
    assert webhooks.deliver_once(sm, strict, event, attempt=1) is False
    assert receiver.received == []
    with sm() as s:
        [row] = s.scalars(select(WebhookDelivery)).all()
    assert row.status_code is None and "loopback" in row.error
    # a receiver that is down is an error worth retrying, recorded too
    gone = webhooks.Event("evt_2", "image.done", None, "http://127.0.0.1:9/", b"{}")
    with pytest.raises(webhooks.DeliveryFailed):
        webhooks.deliver_once(sm, settings, gone, attempt=1)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook", "http://localhost/hook", "http://10.0.0.7/hook", "http://192.168.1.1/",
    "http://172.16.0.1/", "http://169.254.169.254/latest/meta-data", "http://[::1]/", "http://[fe80::1]/",
    "http://[::ffff:127.0.0.1]/", "http://[64:ff9b::7f00:1]/", "http://[64:ff9b::a00:7]/",
    "http://[64:ff9b:1::808:808]/", "http://[2002:7f00:1::]/", "http://[2002:a9fe:a9fe::1]/",
    "http://[::127.0.0.1]/", "http://[::10.0.0.7]/", "http://[::ffff:0:a00:7]/",
    "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", "http://0.0.0.0/", "http://100.64.0.1/", "ftp://example.com/hook",
    "file:///etc/passwd", "gopher://127.0.0.1/", "http://user:pw@93.184.216.34/", "http:///nohost",
    "http://93.184.216.34:99999/", "https://no-such-host.invalid/hook"])
def test_private_and_odd_callback_urls_are_refused(url, settings):
    strict = replace(settings, webhook_allow="")
    with pytest.raises(InvalidRequest) as e:
        webhooks.check_callback(url, strict)
    assert e.value.code == "callback_url_refused"


def test_public_addresses_and_allowed_hosts_pass(settings):
    strict = replace(settings, webhook_allow="")
    assert webhooks.check_callback("https://93.184.216.34/hooks/captioner", strict)
    # IPv6 forms that embed a public IPv4 address pass: only what they embed is refused
    for url in ("http://[64:ff9b::5db8:d822]/", "http://[2002:5db8:d822::1]/", "http://[2606:4700::1111]/"):
        assert webhooks.check_callback(url, strict)
    assert webhooks.check_callback("http://127.0.0.1:8080/hook", settings)  # named by the allow-list
    assert webhooks.check_callback("http://localhost:8080/hook", settings)


def test_the_api_takes_callback_urls_and_refuses_bad_ones(app_settings):
    key = make_key(app_settings.database_url)
    client = keyed(create_app(replace(app_settings, webhook_secret=SECRET, webhook_allow="127.0.0.1")), key)
    upload = {"file": (io.BytesIO(jpeg()), "a.jpg"), "callback_url": "http://127.0.0.1:8999/hook"}
    assert client.post("/v1/images", data=upload).status_code == 202
    bad = {"file": (io.BytesIO(jpeg()), "a.jpg"), "callback_url": "http://10.0.0.1/hook"}
    body = assert_error(client.post("/v1/images", data=bad), 400, "callback_url_refused")
    assert "10.0.0.1" in body["error"]["message"]
    assert_error(client.post("/v1/batches", json={"images": [{"s3": {"bucket": "b", "key": "k.jpg"}}],
                                                  "callback_url": 5}), 400, "invalid_request")
    assert_error(client.post("/v1/batches", json={"s3": {"bucket": "b", "prefix": "p/"},
                                                  "callback_url": "file:///etc/passwd"}), 400, "callback_url_refused")
    # no secret configured: events could not be signed, so a callback is refused up front
    unsigned = keyed(create_app(app_settings), key)
    body = assert_error(unsigned.post("/v1/images", data={"file": (io.BytesIO(jpeg()), "a.jpg"),
                                                          "callback_url": "https://93.184.216.34/hook"}),
                        400, "webhooks_not_configured")
    assert "CAPTIONER_WEBHOOK_SECRET" in body["error"]["message"]
