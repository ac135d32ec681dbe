"""Who is calling: `Authorization: Bearer <key>` on every API route but the open ones, the signed
session cookie on the web interface's pages (never the other way round), `g.tenant` and `g.scopes`
for the handlers, `require_scope` on each view, and rate limits per key."""
import math
from contextlib import suppress
import time
from datetime import timedelta
from functools import wraps
from typing import Any, Callable

from flask import Flask, Response, current_app, flash, g, redirect, request, session, url_for
from flask_limiter import Limiter, RateLimitExceeded
from flask_limiter.util import get_remote_address
from limits import parse, parse_many
from limits.errors import StorageError
from werkzeug.exceptions import MethodNotAllowed

from captioner.core import auth
from captioner.core.errors import AccessDenied, ConfigError, Unauthenticated
from captioner.core.settings import Settings
from captioner.core.tables import SCOPES

from . import get_session, services
from .errors import Answer, _response

# health probes for the orchestrator, the API's own documentation: nothing of any tenant's;
# Prometheus' /metrics, which has a token of its own (CAPTIONER_METRICS_TOKEN), not a tenant's key;
# and the web interface's sign-in and sign-out forms and its stylesheet and script
OPEN = frozenset({"health.healthz", "health.readyz", "docs.openapi", "docs.docs_page", "metrics.metrics",
                  "web.sign_in", "web.sign_out", "static"})
UNLIMITED = OPEN - {"web.sign_in"}  # every sign-in attempt counts against its client address
SESSION_LIFETIME = timedelta(hours=12)  # from signing in: then sign in again, even with the browser left open
ALL_SCOPES = auth.implied("admin")


def require_scope(scope: str | dict[str, str]) -> Callable:
    """Mark a view as needing `scope` (GET: read; POST, PATCH, DELETE: write), or a scope per
    method for a view serving several. A view without the mark needs admin: a route added without
    thought is closed, not open."""
    for s in scope.values() if isinstance(scope, dict) else [scope]:
        if s not in SCOPES:
            raise ValueError(f"no scope {s!r}; scopes: {', '.join(SCOPES)}")

    def mark(view: Callable) -> Callable:
        @wraps(view)
        def checked(*args: Any, **kwargs: Any) -> Any:
            method = "GET" if request.method == "HEAD" else request.method  # HEAD is a GET without the body
            needed = scope[method] if isinstance(scope, dict) else scope
            if needed not in g.scopes:
                raise AccessDenied(f"this API key lacks the {needed} scope (it has: {' '.join(sorted(g.scopes))})",
                                   code="insufficient_scope")
            return view(*args, **kwargs)

        checked.required_scope = scope  # type: ignore[attr-defined]
        return checked

    return mark


def _bearer() -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if not header:
        raise Unauthenticated("this API needs a key: send Authorization: Bearer <key>", code="missing_api_key")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthenticated("send the key as Authorization: Bearer <key>", code="invalid_api_key")
    return key.strip()


def guarded(authenticate: Callable[[], auth.Caller]) -> auth.Caller:
    """Run `authenticate`, counting a wrong key against the client's address: past
    CAPTIONER_AUTH_FAILURE_LIMIT the address gets 429 until the window passes, so keys cannot be
    guessed at the rate a client can send. A missing key is not a guess and is not counted."""
    limiter, limit = current_app.extensions["captioner_limiter"], current_app.extensions["captioner_auth_failures"]
    where = ("auth-failures", get_remote_address())
    try:
        reset = None if limiter.limiter.test(limit, *where) else limiter.limiter.get_window_stats(limit, *where)[0]
    except StorageError:  # the count's store is down: authentication goes on without it
        reset = None
    if reset is not None:
        raise TooManyFailures(max(1, math.ceil(reset - time.time())))
    try:
        return authenticate()
    except Unauthenticated as e:
        if e.code != "missing_api_key":
            with suppress(StorageError):
                limiter.limiter.hit(limit, *where)
        raise


class TooManyFailures(Exception):
    """A client address past CAPTIONER_AUTH_FAILURE_LIMIT; `retry` seconds until it may try again."""

    def __init__(self, retry: int) -> None:
        self.retry = retry


def _too_many_failures(e: TooManyFailures) -> Answer:
    return _response(429, "rate_limited", f"too many failed authentications from this address; retry in {e.retry} s",
                     [("Retry-After", str(e.retry))])


def _key_caller() -> auth.Caller:
    # the request's own session: one connection per request, not one for the key and one for the work
    db = get_session()
    caller = guarded(lambda: auth.authenticate(db, _bearer()))
    if db.dirty:
        db.commit()  # the once-a-minute last-used stamp
    return caller


def _session_caller() -> auth.Caller | None:
    """A web page's caller: the API key whose id the signed session cookie holds, read again on
    every request, so that revoking the key ends its sessions at once; None when not signed in."""
    key_id = session.get("key_id")
    if key_id is None:
        return None
    if time.time() - session.get("signed_in_at", 0) > SESSION_LIFETIME.total_seconds():
        session.clear()
        flash(f"Sessions last {SESSION_LIFETIME.total_seconds() / 3600:g} hours: sign in again.", "error")
        return None
    db = get_session()
    try:
        caller = auth.caller_of_key(db, key_id, session.get("generation"))
    except Unauthenticated as e:
        session.clear()
        flash(f"{e.message}: sign in with a valid key.", "error")
        return None
    if db.dirty:
        db.commit()
    return caller


def _identify() -> Response | None:
    """Set g.tenant and g.scopes for this request, or answer 401 (the API) or send the browser
    to the sign-in page (the web interface)."""
    # A method a path does not serve is a 405 (with Allow) whoever asks: the public OpenAPI
    # document says which paths exist. A path that does not exist stays a 401 without a key.
    if request.endpoint in OPEN or isinstance(request.routing_exception, MethodNotAllowed):
        return None
    if services().settings.auth == "off":
        caller = auth.Caller("default", ALL_SCOPES, None, None)
    elif request.blueprint == "web":
        signed_in = _session_caller()
        if signed_in is None:
            return redirect(url_for("web.sign_in", next=request.full_path.rstrip("?")), 303)
        caller = signed_in
    else:
        caller = _key_caller()
    g.caller, g.tenant, g.scopes = caller, caller.tenant, caller.scopes
    # who a recorded decision (alt text) names: the key's public prefix, never the key
    g.principal = f"key cap_{caller.prefix}" if caller.prefix else "local user (auth off)"
    view = current_app.view_functions.get(request.endpoint or "")
    if view is not None and not hasattr(view, "required_scope") and "admin" not in g.scopes:
        raise AccessDenied("this route needs the admin scope", code="insufficient_scope")
    return None


def _rate_key() -> str:
    caller = g.get("caller")
    return f"key:{caller.prefix}" if caller is not None and caller.prefix else f"addr:{get_remote_address()}"


def _storage_url(settings: Settings) -> str:
    if settings.ratelimit_storage_url:
        return settings.ratelimit_storage_url
    if settings.broker_url and settings.broker_url.startswith(("redis://", "rediss://")):
        return settings.broker_url
    return "memory://"  # per process: with several gunicorn workers the effective limit is multiplied


def _too_many(e: RateLimitExceeded) -> Answer:
    limit = current_app.extensions["captioner_limiter"].current_limit
    retry = max(1, math.ceil(limit.reset_at - time.time())) if limit else 1
    return _response(429, "rate_limited", f"more than {e.description} for this API key; retry in {retry} s",
                      [("Retry-After", str(retry))])


def init_app(app: Flask, settings: Settings) -> None:
    """Before the limiter's own hook (Flask runs them in order): limits count by the caller's key."""
    try:
        parse_many(settings.rate_limit)
    except ValueError:
        raise ConfigError(f"CAPTIONER_RATE_LIMIT must look like 600/minute or 10/second;100/hour, "
                          f"got {settings.rate_limit!r}") from None
    try:
        parse(settings.auth_failure_limit)
    except ValueError:
        raise ConfigError(f"CAPTIONER_AUTH_FAILURE_LIMIT must look like 20/minute, "
                          f"got {settings.auth_failure_limit!r}") from None
    app.before_request(_identify)
    limiter = Limiter(
        # an application limit: one count per key across every route, not one per route
        _rate_key, app=app, application_limits=[settings.rate_limit], storage_uri=_storage_url(settings),
        application_limits_exempt_when=lambda: request.endpoint in UNLIMITED,
        key_prefix="captioner",
        # a Redis outage must not take the API down with it: count in memory until it is back
        in_memory_fallback_enabled=True, swallow_errors=True, storage_options={"wrap_exceptions": True})
    app.extensions["captioner_limiter"] = limiter
    app.extensions["captioner_auth_failures"] = parse(settings.auth_failure_limit)
    app.register_error_handler(RateLimitExceeded, _too_many)
    app.register_error_handler(TooManyFailures, _too_many_failures)


def check_s3(locations: list[tuple[str, str]]) -> None:
    """403 unless the caller's tenant may read every (bucket, key or prefix). With auth off the one
    user may read whatever the service can."""
    if services().settings.auth != "off":
        auth.check_s3(get_session(), g.tenant, locations)
