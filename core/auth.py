"""API keys and tenants: who is calling, what they may do, and which S3 locations they may read.

A key is `cap_<prefix>_<secret>`: the prefix (public, random) finds the row, the secret (256 random
bits) is never stored; the row holds the sha256 of the whole key. A plain hash is enough: a salt or
a slow hash protects low-entropy passwords, not random tokens. The key itself is never passed to
the database, so no SQL log or driver error can contain it."""
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta, timezone

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from .errors import AccessDenied, InvalidRequest, NotFound, Unauthenticated
from .tables import SCOPES, ApiKey, ServiceSecret, TenantBucket, utcnow

KEY = re.compile(r"cap_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")
TENANT = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")  # short, printable, and safe in logs and paths
TOUCH_EVERY = timedelta(seconds=60)  # last_used_at is this precise: one UPDATE per key a minute, not per request
SESSION_SECRET = "web-session"  # the service_secrets row that signs web sessions when CAPTIONER_SECRET_KEY is unset


@dataclass(frozen=True)
class Caller:
    tenant: str
    scopes: frozenset[str]
    key_id: int | None  # None with auth off
    prefix: str | None  # the key's public part: what rate limits count by


def implied(scope: str) -> frozenset[str]:
    """A scope and every scope below it: admin ⊇ write ⊇ read."""
    return frozenset(SCOPES[:SCOPES.index(scope) + 1])


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant(tenant: str) -> str:
    if not TENANT.fullmatch(tenant):
        raise InvalidRequest(f"tenant names are 1 to 64 of a-z, 0-9, '_', '.', '-' (starting with a letter or "
                             f"digit), not {tenant!r}")
    return tenant


def create_key(session: Session, tenant: str, scope: str = "write", name: str = "") -> tuple[ApiKey, str]:
    """A new key for `tenant` with `scope` (and every scope below it) -> (row, the key). The key is
    returned this once: only its hash is stored."""
    if scope not in SCOPES:
        raise InvalidRequest(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    prefix = secrets.token_hex(6)
    key = f"cap_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(tenant=check_tenant(tenant), name=name, prefix=prefix, hash=_digest(key),
                 scopes=" ".join(sorted(implied(scope), key=SCOPES.index)))
    session.add(row)
    session.flush()
    return row, key


def authenticate(session: Session, key: str) -> Caller:
    """The caller a key stands for; Unauthenticated when it is malformed, unknown or revoked."""
    match = KEY.fullmatch(key)
    row = session.scalars(select(ApiKey).where(ApiKey.prefix == match.group(1))).first() if match else None
    # compare_digest: the time taken does not tell how much of a guessed hash matched
    if row is None or not hmac.compare_digest(row.hash, _digest(key)):
        raise Unauthenticated("unknown API key; send Authorization: Bearer <key> with a key from "
                              "`captioner keys create`", code="invalid_api_key")
    return _caller(row)


def caller_of_key(session: Session, key_id: int, generation: int | None) -> Caller:
    """The caller a web session stands for: the key it was signed in with, read again on every
    request, so that revoking (or deleting) the key, or signing out, ends its sessions at once."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise Unauthenticated(f"API key {key_id} no longer exists", code="invalid_api_key")
    if generation != row.session_generation:
        raise Unauthenticated("this session was signed out", code="signed_out")
    return _caller(row)


def session_generation(session: Session, key_id: int) -> int:
    """What a session signed in now with the key carries (see ApiKey.session_generation)."""
    return session.scalars(select(ApiKey.session_generation).where(ApiKey.id == key_id)).one()


def end_sessions(session: Session, key_id: int) -> None:
    """Sign out everywhere: every web session signed in with the key so far ends, wherever its
    cookie was copied to (the cookie is signed, not stored: only its generation can be voided)."""
    session.execute(update(ApiKey).where(ApiKey.id == key_id)
                    .values(session_generation=ApiKey.session_generation + 1))


def _caller(row: ApiKey) -> Caller:
    if row.revoked_at is not None:
        raise Unauthenticated(f"API key {row.id} was revoked", code="revoked_api_key")
    _touch(row)
    return Caller(row.tenant, frozenset(row.scopes.split()), row.id, row.prefix)


def _touch(row: ApiKey) -> None:
    """Record that a key was used, at most once per TOUCH_EVERY: most requests write nothing (on
    SQLite even an UPDATE that matches no row would take the database's one write lock). The
    caller commits when the session is dirty."""
    now, last = utcnow(), row.last_used_at
    if last is None or last.replace(tzinfo=last.tzinfo or timezone.utc) < now - TOUCH_EVERY:  # SQLite: naive UTC
        row.last_used_at = now


def revoke_key(session: Session, key_id: int) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"no API key with id {key_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def list_keys(session: Session, tenant: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.id)
    if tenant is not None:
        query = query.where(ApiKey.tenant == tenant)
    return list(session.scalars(query))


def allow_bucket(session: Session, tenant: str, bucket: str, prefix: str = "") -> None:
    if session.get(TenantBucket, (check_tenant(tenant), bucket, prefix)) is None:
        session.add(TenantBucket(tenant=tenant, bucket=bucket, prefix=prefix))
        session.flush()


def deny_bucket(session: Session, tenant: str, bucket: str, prefix: str = "") -> None:
    row = session.get(TenantBucket, (tenant, bucket, prefix))
    if row is None:
        raise NotFound(f"tenant {tenant} has no allowance for s3://{bucket}/{prefix}")
    session.delete(row)


def allowed_buckets(session: Session, tenant: str | None = None) -> list[TenantBucket]:
    query = select(TenantBucket).order_by(TenantBucket.tenant, TenantBucket.bucket, TenantBucket.prefix)
    if tenant is not None:
        query = query.where(TenantBucket.tenant == tenant)
    return list(session.scalars(query))


def check_s3(session: Session, tenant: str, locations: list[tuple[str, str]]) -> None:
    """AccessDenied unless every (bucket, key or prefix) lies under one of the tenant's allowed
    locations. Checked before S3 is asked anything, so a tenant learns nothing about other buckets."""
    allowed = [(r.bucket, r.prefix) for r in allowed_buckets(session, tenant)]
    for bucket, key in locations:
        if not any(bucket == b and key.startswith(p) for b, p in allowed):
            raise AccessDenied(f"s3://{bucket}/{key}: this tenant may not read this S3 location; an operator "
                               f"can allow it with `captioner tenants allow-bucket {tenant} s3://{bucket}/...`",
                               code="bucket_not_allowed")


def web_session_secret(session: Session) -> str:
    """The key that signs web sessions when none is configured: made by the first API process that
    asks (256 random bits), then read by every other one, so a session cookie is good on any
    process of a fleet and survives restarts. Two processes asking at once agree: the second
    insert does nothing and both read the first one's row."""
    insert = (postgresql if session.get_bind().dialect.name == "postgresql" else sqlite).insert
    session.execute(insert(ServiceSecret)
                    .values(name=SESSION_SECRET, value=secrets.token_urlsafe(32), created_at=utcnow())
                    .on_conflict_do_nothing(index_elements=["name"]))
    return session.scalars(select(ServiceSecret.value).where(ServiceSecret.name == SESSION_SECRET)).one()
