"""Callback events: when an image is done or failed, POST a signed JSON event to the callback URL
its job or batch carries, and record every attempt.

Signature: HMAC-SHA256 with CAPTIONER_WEBHOOK_SECRET over `<timestamp>.<body>`, sent as
`X-Captioner-Signature: sha256=<hex>` beside `X-Captioner-Timestamp` (Stripe's scheme: the
timestamp inside the MAC lets a receiver refuse replays).

Server-side request forgery: a callback may not reach private, loopback, link-local or other
non-global addresses (every address the name resolves to is checked) unless CAPTIONER_WEBHOOK_ALLOW
names the host or address. The check runs at submission and again at each delivery, and the POST
goes to the address that passed the check, so a name re-pointed in between (DNS rebinding) cannot
steer it elsewhere.

Isolation: an attempt has a wall-clock deadline (connect + send + response, whatever the receiver
drips), reads at most RESPONSE_BYTES of the answer and never follows a redirect; with a broker,
deliveries run on their own `webhooks` queue, served by a worker that captions nothing.

Outbox: an event is a `webhook_events` row written in the transaction that finishes its job, so a
broker error or a crash after the commit cannot lose it. The delivery task claims the row, makes
one attempt and marks it; the sweep sends again any row left due."""
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable
from urllib.parse import urlsplit

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from . import alttext
from .errors import InvalidRequest, TransientError
from .settings import Settings
from .tables import Batch, BatchImage, Caption, Image, Job, WebhookDelivery, WebhookEvent, utcnow

log = logging.getLogger(__name__)

MAX_URL = 2000
INLINE_ATTEMPTS = 3  # embedded mode retries in-process, so a dead receiver must not hold the run long
INLINE_BACKOFF_SECONDS = 0.5  # then 1 s
RESPONSE_BYTES = 4096  # of a receiver's answer read, at most: only its status matters
BACKOFF_MAX_SECONDS = 600


class DeliveryFailed(TransientError):
    """The receiver did not answer 2xx (or could not be reached): worth another attempt later."""
    code = "webhook_failed"


@dataclass(frozen=True)
class Event:
    id: str  # the same on every attempt, so a receiver can drop duplicates
    type: str  # image.done or image.failed
    job_id: int | None
    url: str
    body: bytes


def _refused(url: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"callback_url {url[:200]!r} refused: {why}", code="callback_url_refused")


def redact(url: str) -> str:
    """A callback URL as logs show it: without its query string or fragment, which may carry a token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" + ("?..." if parts.query else "")


def _allow_list(settings: Settings) -> set[str]:
    return {a.strip().lower() for a in settings.webhook_allow.split(",") if a.strip()}


def resolve(url: str, settings: Settings) -> list[str]:
    """The addresses a callback URL may be POSTed to, or InvalidRequest saying why it may not."""
    if not isinstance(url, str) or len(url) > MAX_URL:
        raise _refused(str(url), f"it must be a URL of at most {MAX_URL} characters")
    if any(not 33 <= ord(c) < 127 for c in url):
        # an HTTP request line and Host header are ASCII: "１２７.0.0.1" resolved (IDNA folds it to
        # 127.0.0.1) and then failed at delivery with a UnicodeEncodeError
        raise _refused(url, "it must be ASCII without spaces or control characters: percent-encode other "
                            "characters and write an internationalised host name in its xn-- (punycode) form")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise _refused(url, "only http and https callbacks are sent")
    if parts.username is not None or parts.password is not None:
        raise _refused(url, "credentials in the URL are not sent; the signature authenticates us")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise _refused(url, "the port is not a number from 0 to 65535") from None
    host = parts.hostname
    if not host:
        raise _refused(url, "it names no host")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise _refused(url, f"{host} does not resolve ({e})") from None
    allow = _allow_list(settings)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])  # drop an IPv6 zone index
        inner = _embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else []
        if host.lower() in allow or {str(a) for a in (ip, *inner)} & allow:
            continue
        bad = next((a for a in (ip, *inner) if not a.is_global or a.is_multicast or a in LOCAL_NAT64), None)
        if bad is not None:
            shown = str(ip) if bad == ip else f"{ip}, which embeds {bad},"
            raise _refused(url, f"{host} resolves to {shown} a private, loopback, link-local or reserved "
                                "address (CAPTIONER_WEBHOOK_ALLOW can name hosts to allow)")
    return addresses


# IPv6 forms that carry an IPv4 address a gateway may forward to: NAT64 (RFC 6052) and the
# deprecated IPv4-compatible and IPv4-translated forms keep it in the last 32 bits
LOW32_FORMS = [ipaddress.ip_network(n) for n in ("64:ff9b::/96", "::/96", "::ffff:0:0:0/96")]
LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: a site's own NAT64, never a public address


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address embeds (mapped, NAT64, 6to4, Teredo's server and client,
    IPv4-compatible): ::ffff:127.0.0.1 or 64:ff9b::7f00:1 reach loopback through a gateway."""
    if ip.ipv4_mapped:
        return [ip.ipv4_mapped]
    if ip.sixtofour:
        return [ip.sixtofour]
    if ip.teredo:
        return list(ip.teredo)
    if any(ip in n for n in LOW32_FORMS):
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    return []


def check_callback(url: Any, settings: Settings) -> str:
    """A callback URL given at submission -> the URL, or a clear InvalidRequest."""
    if settings.webhook_secret is None:
        raise InvalidRequest("callback_url needs CAPTIONER_WEBHOOK_SECRET set on the server (events are signed)",
                             code="webhooks_not_configured")
    resolve(url, settings)
    return url


def sign(secret: str, timestamp: str, body: bytes) -> str:
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def targets(session: Session, job_ids: list[int]) -> list[tuple[int, str]]:
    """(job id, callback URL) pairs for finished jobs: the job's own callback and those of the
    batches (for the same model) its image belongs to."""
    if not job_ids:
        return []
    own = session.execute(select(Job.id, Job.callback_url).where(Job.id.in_(job_ids),
                                                                 Job.callback_url.is_not(None))).all()
    batch = session.execute(
        select(Job.id, Batch.callback_url).join(BatchImage, BatchImage.image_id == Job.image_id)
        .join(Batch, (Batch.id == BatchImage.batch_id) & (Batch.model_version == Job.model_version))
        .where(Job.id.in_(job_ids), Batch.callback_url.is_not(None))).all()
    return list(dict.fromkeys((job_id, url) for job_id, url in [*own, *batch]))


def event(session: Session, job_id: int, url: str) -> Event:
    """The event for a finished job, as JSON bytes; the same job and URL give the same id."""
    job = session.get(Job, job_id)
    assert job is not None and job.status in ("done", "failed"), f"job {job_id} is not finished"
    caption = session.scalars(select(Caption).where(Caption.image_id == job.image_id,
                                                    Caption.model_version == job.model_version)).first()
    image = session.get(Image, job.image_id)
    alt = alttext.view(session, job.image_id, image.tenant) if image else None
    kind = f"image.{job.status}"
    event_id = f"evt_{job_id}_{job.status}_{hashlib.sha256(url.encode()).hexdigest()[:12]}"
    body = {
        "id": event_id, "type": kind, "created_at": utcnow().isoformat(),
        "data": {"image_id": job.image_id, "job_id": job.id, "status": job.status, "model_version": job.model_version,
                 "caption": caption.text if caption else None,
                 "alt_text": alt["text"] if alt else None, "alt_text_state": alt["state"] if alt else None,
                 "error": {"code": job.error_code, "message": job.error_message} if job.status == "failed" else None,
                 "url": f"/v1/images/{job.image_id}"},
    }
    return Event(event_id, kind, job_id, url, json.dumps(body).encode())


class DeadlineExceeded(Exception):
    """The receiver did not finish answering within the attempt's wall-clock deadline."""


def _post(url: str, address: str, headers: dict[str, str], body: bytes, deadline_s: float) -> int:
    """POST to `address` (already checked) while naming the host as the URL does (Host, TLS SNI and
    certificate check); never follows a redirect (it could point anywhere). The whole exchange has
    `deadline_s` of wall-clock time: a socket timeout only bounds each read, which a receiver
    dripping a byte at a time resets forever, so a timer shuts the socket at the deadline."""
    parts = urlsplit(url)
    host, https = parts.hostname or "", parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    started = time.monotonic()
    sock = socket.create_connection((address, port), timeout=deadline_s)
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        try:
            sock.shutdown(socket.SHUT_RDWR)  # a blocked send or recv returns at once
        except OSError:
            pass

    timer = threading.Timer(max(0.0, deadline_s - (time.monotonic() - started)), cut)
    timer.daemon = True
    timer.start()
    try:
        if https:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        conn = http.client.HTTPConnection(host, port)
        conn.sock = sock  # connected (and checked) above: http.client must not resolve the name again
        conn.request("POST", path, body=body, headers={**headers, "Host": parts.netloc})
        response = conn.getresponse()
        response.read(RESPONSE_BYTES)  # enough to end a small answer cleanly; a larger one is cut off
        if expired.is_set():  # the cut ended the read early, which http.client takes for the body's end
            raise DeadlineExceeded(f"no complete answer within {deadline_s:g} s")
        return response.status
    except (OSError, http.client.HTTPException) as e:
        if expired.is_set():
            raise DeadlineExceeded(f"no complete answer within {deadline_s:g} s") from None
        raise e
    finally:
        timer.cancel()
        sock.close()


def deliver_once(sm: sessionmaker, settings: Settings, ev: Event, attempt: int) -> bool:
    """One attempt, recorded whatever happens -> True when the receiver answered 2xx. Raises
    DeliveryFailed when another attempt may succeed; a refused URL or a missing secret is final."""
    status, error, retry = None, None, False
    try:
        if settings.webhook_secret is None:
            raise InvalidRequest("CAPTIONER_WEBHOOK_SECRET is not set: events cannot be signed")
        address = resolve(ev.url, settings)[0]  # again now: the name may point elsewhere since submission
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "User-Agent": "captioner-webhooks/1",
                   "X-Captioner-Event": ev.type, "X-Captioner-Event-Id": ev.id,
                   "X-Captioner-Timestamp": timestamp,
                   "X-Captioner-Signature": f"sha256={sign(settings.webhook_secret, timestamp, ev.body)}"}
        status = _post(ev.url, address, headers, ev.body, settings.webhook_timeout_seconds)
        if not 200 <= status < 300:
            error, retry = f"HTTP {status}", True
    except InvalidRequest as e:
        error = e.message
    except Exception as e:  # refused, reset, deadline, TLS, a malformed answer: worth another try
        error, retry = f"{e.__class__.__name__}: {e}"[:2000], True
    with sm.begin() as s:
        s.add(WebhookDelivery(event_id=ev.id, event=ev.type, job_id=ev.job_id, url=ev.url, attempt=attempt,
                              status_code=status, error=error, at=utcnow()))
    if error is None:
        return True
    log.warning("webhook %s attempt %d to %s: %s", ev.id, attempt, redact(ev.url), error)
    if retry:
        raise DeliveryFailed(f"{redact(ev.url)}: {error}")
    return False


def record_events(session: Session, job_ids: list[int]) -> list[int]:
    """Outbox rows for the events of jobs just finished, in the caller's transaction (the one that
    finished them) -> their ids, to publish once it has committed."""
    rows = [WebhookEvent(event_id=ev.id, event=ev.type, job_id=ev.job_id, url=ev.url, body=ev.body.decode(),
                         due_at=utcnow()) for ev in (event(session, j, url) for j, url in targets(session, job_ids))]
    session.add_all(rows)
    session.flush()
    return [r.id for r in rows]


def backoff(attempts: int) -> float:
    return float(min(BACKOFF_MAX_SECONDS, 2 ** attempts))  # 2, 4, 8 ... s


def deliver_event(sm: sessionmaker, settings: Settings, outbox_id: int, now_due: bool = False) -> float | None:
    """Claim one outbox row and make one attempt -> seconds until the next attempt is due, or None
    when there is none (delivered, given up, or claimed / finished by another message). The claim
    makes duplicate messages harmless: only one of them finds the row due. `now_due`: attempt
    whatever its due time (embedded mode's short in-process retries)."""
    now = utcnow()
    lease = now + timedelta(seconds=settings.webhook_timeout_seconds + 30)
    due = [WebhookEvent.id == outbox_id, WebhookEvent.status == "pending"]
    if not now_due:
        due.append(WebhookEvent.due_at <= now)
    with sm.begin() as s:
        row = s.execute(update(WebhookEvent).where(*due)
                        .values(attempts=WebhookEvent.attempts + 1, due_at=lease)
                        .returning(WebhookEvent.attempts, WebhookEvent.event_id, WebhookEvent.event,
                                   WebhookEvent.job_id, WebhookEvent.url, WebhookEvent.body)
                        .execution_options(synchronize_session=False)).first()
    if row is None:
        return None
    ev = Event(row.event_id, row.event, row.job_id, row.url, row.body.encode())
    status, delay = "given_up", None
    try:
        if deliver_once(sm, settings, ev, row.attempts):
            status = "delivered"
    except DeliveryFailed:
        if row.attempts < settings.webhook_max_attempts:
            status, delay = "pending", backoff(row.attempts)
    with sm.begin() as s:
        s.execute(update(WebhookEvent).where(WebhookEvent.id == outbox_id).values(
            status=status, due_at=utcnow() + timedelta(seconds=delay or 0)))
    return delay


def overdue(session: Session, requeue_after_seconds: int) -> list[int]:
    """Outbox rows due for longer than requeue_after: their message was lost (a broker error at
    publish, a worker killed mid-attempt). Each is marked due now, so the next sweep waits again."""
    now = utcnow()
    return list(session.scalars(
        update(WebhookEvent)
        .where(WebhookEvent.status == "pending", WebhookEvent.due_at < now - timedelta(seconds=requeue_after_seconds))
        .values(due_at=now).returning(WebhookEvent.id).execution_options(synchronize_session=False)))


def deliver_inline(sm: sessionmaker, settings: Settings, outbox_ids: list[int],
                   sleep: Callable[[float], None] = time.sleep) -> None:
    """Embedded mode (no broker, no retry queue): deliver after each batch with a short bounded
    retry. Nothing here may stop the run: an event that cannot go out stays in the outbox."""
    for outbox_id in outbox_ids:
        for attempt in range(1, INLINE_ATTEMPTS + 1):
            try:
                if deliver_event(sm, settings, outbox_id, now_due=True) is None:
                    break
            except Exception:
                log.exception("webhook event %d: delivery failed; it stays in the outbox", outbox_id)
                break
            if attempt < INLINE_ATTEMPTS:
                sleep(INLINE_BACKOFF_SECONDS * 2 ** (attempt - 1))
