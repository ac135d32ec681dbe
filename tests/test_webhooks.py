"""Callback events against a real HTTP receiver on loopback (http.server in a thread): signed,
retried, every attempt recorded; callback URLs that reach private addresses are refused."""
import hashlib
import hmac
import io
import json
import threading
import time
from dataclasses import replace
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select, update
from conftest import keyed, make_key  # siblings: tests/ is on sys.path
from test_api import assert_error, jpeg

from captioner.api import create_app
from captioner.core import captioner, jobs, queries, queue, webhooks
from captioner.core.queue import create_celery
from captioner.core.db import make_engine, make_sessionmaker
from captioner.core.errors import InvalidRequest
from captioner.core.settings import Settings
from captioner.core.tables import Job, WebhookDelivery, WebhookEvent

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


class Hostile:
    """A receiver that answers in a way that would hold a naive client: `drip` sends its headers,
    then one byte of body every 0.5 s (for up to 30 s); `flood` sends a 200 MB body."""

    def __init__(self, kind: str) -> None:
        self.served = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                hostile.served += 1
                try:
                    self.send_response(200)
                    if kind == "drip":
                        self.send_header("Content-Length", "60")
                        self.end_headers()
                        for _ in range(60):
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            time.sleep(0.5)
                    else:
                        chunk = b"x" * (1 << 20)
                        self.send_header("Content-Length", str(200 * len(chunk)))
                        self.end_headers()
                        for _ in range(200):
                            self.wfile.write(chunk)
                except OSError:  # the client hung up: what it should do
                    pass

            def log_message(self, *args) -> None:
                pass

        hostile = self
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook?token=do-not-log-me"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hostile(request):
    made = []

    def make(kind: str) -> Hostile:
        made.append(Hostile(kind))
        return made[-1]
    yield make
    for h in made:
        h.close()


def _clean_deliveries(sm) -> None:
    with sm.begin() as s:
        s.execute(WebhookDelivery.__table__.delete())


def test_a_dripping_receiver_is_cut_at_the_attempts_deadline(settings, hostile, caplog):
    """Found by the audit: the timeout was per read, so a receiver dripping a byte every 0.5 s held
    a delivery (and, then, the captioning process) for as long as it liked. The query string, which
    may carry a token, is not logged."""
    sm = make_sessionmaker(make_engine(settings.database_url))
    _clean_deliveries(sm)
    drip = hostile("drip")
    started = time.monotonic()
    with pytest.raises(webhooks.DeliveryFailed):
        webhooks.deliver_once(sm, replace(settings, webhook_timeout_seconds=2),
                              webhooks.Event("evt_d", "image.done", None, drip.url, b"{}"), attempt=1)
    assert time.monotonic() - started < 5
    with sm() as s:
        [row] = s.scalars(select(WebhookDelivery)).all()
    assert "within 2 s" in row.error
    assert "do-not-log-me" not in caplog.text and "/hook?..." in caplog.text


def test_a_200_mb_answer_is_not_read(settings, hostile):
    """Found by the audit: a 200 MB response body was read whole into memory."""
    import tracemalloc

    sm = make_sessionmaker(make_engine(settings.database_url))
    flood = hostile("flood")
    tracemalloc.start()
    try:
        started = time.monotonic()
        assert webhooks.deliver_once(sm, settings, webhooks.Event("evt_f", "image.done", None, flood.url, b"{}"),
                                     attempt=1) is True
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"{peak / 2**20:.0f} MiB held while delivering"
    assert time.monotonic() - started < 5


def test_a_non_latin1_host_is_refused_at_submission(settings, app_settings):
    """Found by the audit: "１２７.0.0.1" resolves (IDNA folds full-width digits) and passed the
    check, then raised an uncaught UnicodeEncodeError when the event was sent."""
    for url in ("http://１２７.0.0.1:8080/hook", "http://127.0.0.1/ü", "http://exa mple.com/"):
        with pytest.raises(InvalidRequest) as e:
            webhooks.check_callback(url, settings)
        assert e.value.code == "callback_url_refused" and "ASCII" in e.value.message
    key = make_key(app_settings.database_url)
    client = keyed(create_app(replace(app_settings, webhook_secret=SECRET)), key)
    body = assert_error(client.post("/v1/batches", json={"images": [{"s3": {"bucket": "b", "key": "k.jpg"}}],
                                                         "callback_url": "http://９３.１８４.２１６.３４/hook"}),
                        400, "callback_url_refused")
    assert "punycode" in body["error"]["message"]


def test_an_embedded_run_never_aborts_because_of_a_webhook(settings, photos):
    """Found by the audit: a callback that failed with an error other than a connection error (the
    non-Latin-1 host, here stored as an older release accepted it) aborted `captioner caption`."""
    sm = make_sessionmaker(make_engine(settings.database_url))
    version = captioner.version(settings)
    _, [sub] = jobs.submit_images(sm, [jobs.file_image(photos[0])], version, "interactive", lambda _: None)
    with sm.begin() as s:
        queries.set_callback(s, [sub.job_id], "http://１２７.0.0.1:9/hook")
    jobs.run_embedded(sm, settings, version, None, lambda report: None)
    with sm() as s:
        assert s.get(Job, sub.job_id).status == "done"
        [event] = s.scalars(select(WebhookEvent)).all()
        [row] = s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == sub.job_id)).all()
    assert event.status == "given_up" and "ASCII" in row.error


def test_an_event_survives_a_broker_error_at_publish(settings, receiver, photos, caplog):
    """Found by the audit: events were published after the commit with no error handling and
    nothing re-sent them. Now the event is an outbox row committed with the job: the publish
    fails (nothing listens on the broker's port), the run goes on, and the sweep sends it."""
    sm = make_sessionmaker(make_engine(settings.database_url))
    version = captioner.version(settings)
    _, [sub] = jobs.submit_images(sm, [jobs.file_image(photos[0])], version, "interactive", lambda _: None,
                                  callback_url=f"{receiver.url}/outbox")
    with sm.begin() as s:
        claimed = queries.claim(s, version, 60, 10)
    report = jobs.caption_claimed(sm, settings, claimed)
    dead = create_celery(replace(settings, broker_url="redis://127.0.0.1:9/0"))
    dead.conf.broker_connection_retry = False
    queue.publish_webhooks(dead, list(report.events))  # logs, does not raise
    assert "could not publish 1 webhook events" in caplog.text and receiver.received == []
    with sm.begin() as s:
        assert webhooks.overdue(s, requeue_after_seconds=60) == []  # not yet: its message may be on its way
        s.execute(update(WebhookEvent).values(due_at=WebhookEvent.due_at - timedelta(minutes=2)))
        again = webhooks.overdue(s, requeue_after_seconds=60)
    assert again == list(report.events)
    assert webhooks.deliver_event(sm, settings, again[0]) is None
    assert webhooks.deliver_event(sm, settings, again[0]) is None  # a duplicate message finds nothing due
    [(path, headers, body)] = receiver.received
    assert path == "/outbox" and verify(SECRET, headers, body)["data"]["job_id"] == sub.job_id
    with sm() as s:
        assert s.get(WebhookEvent, again[0]).status == "delivered"


def test_a_worker_that_captions_does_not_deliver(settings):
    """Deliveries have a worker of their own: mixing the webhooks queue with caption queues is refused."""
    from captioner.core.errors import ConfigError
    from captioner.worker.main import start

    with pytest.raises(ConfigError, match="worker of its own"):
        start(replace(settings, broker_url="redis://127.0.0.1:9/0"), "interactive,webhooks", None, False, "info", None)
