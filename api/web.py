"""The web interface: browse, search and review captions in a browser. Server-rendered pages
(api/templates/), one stylesheet and a few lines of script (api/static/); no front-end build.

Every page calls the core functions the JSON API calls (submission, search, alt-text decisions,
batch progress), for the same tenant and with the same scopes. Only the way in differs: a sign-in
form takes an API key and the signed session cookie keeps its id (api/auth.py checks the key again
on every request), and every form carries a CSRF token (Flask-WTF). The JSON API never reads the
cookie, so a page elsewhere cannot make a browser call it, and it needs no token."""
import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Flask, Request, Response, flash, g, redirect, render_template, request, session, url_for
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException

from captioner.core import alttext, auth, batches as core_batches, browse, jobs, queries, search, thumbnails
from captioner.core.errors import Conflict, InvalidImage, InvalidRequest, Unauthenticated
from captioner.core.settings import Settings
from captioner.core.tables import STATUSES

from . import MAX_ID, get_session, services
from .auth import SESSION_LIFETIME, guarded, require_scope
from .errors import Answer, _response

bp = Blueprint("web", __name__)
csrf = CSRFProtect()

PAGE = 24  # cards per page: 24 thumbnails of 10-20 kB
REVIEW_COUNT_CAP = 1000  # the menu shows "999+" beyond this
FAILURES = 50  # failed images a batch's page lists with their error; GET /v1/batches/<id>/images has them all
# pages and forms of this site only; no inline script or style, no framing (clickjacking)
CSP = ("default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
DECIDED = {"approved": "approved", "edited": "saved", "decorative": "marked decorative"}


class WebSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions for the web interface's pages only: an API request gets no
    session, so a cookie can never stand in for its API key."""

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        # Flask opens the session before it routes the request: route it here to see whose it is
        try:
            endpoint, _ = app.create_url_adapter(request).match()  # type: ignore[union-attr]
        except HTTPException:  # no such page (404, 405): Flask answers it, without a session
            return None
        return super().open_session(app, request) if endpoint.startswith(f"{bp.name}.") else None


def init_app(app: Flask, settings: Settings) -> None:
    app.config.update(
        SESSION_COOKIE_NAME="captioner_session", SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax",
        # the signature's age is checked too: a cookie not re-signed for that long is void anyway
        SESSION_COOKIE_SECURE=settings.session_cookie_secure, PERMANENT_SESSION_LIFETIME=SESSION_LIFETIME,
        # the forms of bp alone are checked (in _check_csrf), not the API's
        WTF_CSRF_CHECK_DEFAULT=False,
        # a token lives as long as its session: a review page left open for an hour still submits
        WTF_CSRF_TIME_LIMIT=None)
    app.session_interface = WebSessions()
    csrf.init_app(app)
    app.register_error_handler(CSRFError, _csrf_refused)
    app.register_blueprint(bp)


@bp.before_request
def _check_csrf() -> None:
    if request.method == "POST":
        csrf.protect()


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    return response


def _csrf_refused(e: CSRFError) -> Answer:
    return _response(400, "csrf_failed", f"{e.description} The form was not sent from a page of this site, or the "
                                         "session it belonged to has ended: go back, reload the page and try again.")


@bp.context_processor
def _page_context() -> dict[str, Any]:
    caller = g.get("caller")
    if caller is None:  # the sign-in page, or an error before the caller was known
        return {"caller": None, "can_write": False, "review_count": 0}
    return {"caller": caller, "can_write": "write" in caller.scopes, "auth_off": services().settings.auth == "off",
            "review_count": browse.review_count(get_session(), caller.tenant, REVIEW_COUNT_CAP)}


@bp.app_template_filter("when")
def _when(value: str | datetime | None) -> str:
    """A time as people read it, in UTC to the minute: 2026-11-28 09:41 UTC."""
    if value is None:
        return "—"
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return (moment.replace(tzinfo=moment.tzinfo or timezone.utc)  # SQLite gives naive UTC
            .astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def _number_arg(name: str, high: int = MAX_ID) -> int | None:
    """A paging parameter: an id to page from, or an offset."""
    raw = request.args.get(name)
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or int(raw) > high:
        raise InvalidRequest(f"{name} must be a number from 0 to {high}")
    return int(raw)


def _safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of this site only. Never //host, a full URL, a
    backslash or a control character (browsers read /\\host and /<tab>/host as //host)."""
    target = target or ""
    parts = urlsplit(target)
    if (parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target
            or not target.isprintable()):
        return url_for("web.gallery")
    return target


def _see_other(endpoint: str, **values: Any) -> Response:
    return redirect(url_for(endpoint, **values), 303)  # POST -> GET: a reload does not send the form again


# ---------------------------------------------------------------- signing in and out


@bp.route("/sign-in", methods=["GET", "POST"])
def sign_in() -> Any:
    target = _safe_next(request.values.get("next"))
    if services().settings.auth == "off":
        return redirect(target)
    if request.method != "POST":  # GET, or HEAD (GET without the body)
        return render_template("sign_in.html", next=target)
    db = get_session()
    try:
        caller = guarded(lambda: auth.authenticate(db, request.form.get("key", "").strip()))
    except Unauthenticated as e:
        error = (e.message if e.code == "revoked_api_key" else
                 "This is not a valid API key. Paste the whole key, starting with cap_; an operator makes one "
                 "with `captioner keys create --tenant NAME`.")
        return render_template("sign_in.html", next=target, error=error), 401
    db.commit()  # the last-used stamp
    session.clear()  # nothing of an earlier session (its CSRF token included) carries over
    session["key_id"] = caller.key_id  # the key's id, never the key: the cookie is signed, not encrypted
    session["signed_in_at"] = int(time.time())  # api/auth.py ends the session SESSION_LIFETIME later
    session["generation"] = auth.session_generation(db, caller.key_id)  # signing out voids it
    return redirect(target, 303)


@bp.post("/sign-out")
def sign_out() -> Response:
    """Ends this session and every copy of it (a cookie copied elsewhere too), and every other
    session signed in with the same key."""
    key_id = session.get("key_id")
    if key_id is not None and services().settings.auth != "off":
        db = get_session()
        auth.end_sessions(db, key_id)
        db.commit()
    session.clear()
    flash("Signed out.", "success")
    return _see_other("web.sign_in")


# ---------------------------------------------------------------- browsing and searching


@bp.get("/")
@require_scope("read")
def gallery() -> str:
    page = browse.images(get_session(), g.tenant, PAGE, before=_number_arg("before"), after=_number_arg("after"))
    return render_template("gallery.html", page=page, nav="gallery")


@bp.get("/search")
@require_scope("read")
def search_page() -> Any:
    q = request.args.get("q", "")
    offset = _number_arg("offset", search.MAX_OFFSET) or 0
    if not q.strip():
        return render_template("search.html", q=q, results=None)
    db = get_session()
    try:
        # the same search as GET /v1/search; one row more than shown says whether there is a next page
        rows = search.query_index(db, q, PAGE + 1, offset, tenant=g.tenant)
    except InvalidRequest as e:
        return render_template("search.html", q=q, results=None, error=e.message), 400
    scores = {r["id"]: r["score"] for r in rows[:PAGE]}
    return render_template("search.html", q=q, results=browse.cards(db, g.tenant, list(scores)), scores=scores,
                           offset=offset, more=len(rows) > PAGE and offset + PAGE <= search.MAX_OFFSET)


@bp.get("/images/<id:image_id>")
@require_scope("read")
def image_page(image_id: int) -> str:
    image = queries.image_view(get_session(), image_id, services().model_version, tenant=g.tenant)
    return render_template("image.html", image=image)


def _rendition(image_id: int, size: str) -> Response:
    """A thumbnail or preview: made once, then served from storage; a browser keeps it (the image
    behind an id never changes) and asks again only with another session cookie."""
    image = browse.image(get_session(), image_id, g.tenant)  # checked before a 304 too
    tag = thumbnails.etag(image, size)
    if request.if_none_match.contains(tag):
        response = Response(status=304)
    else:
        captioned = browse.captioned(get_session(), image_id)
        response = Response(thumbnails.get(services().settings, image, size, captioned), mimetype="image/webp")
    response.set_etag(tag)
    response.cache_control.private = True
    response.cache_control.max_age = 365 * 24 * 3600
    response.cache_control.immutable = True
    response.vary.add("Cookie")
    return response


@bp.get("/images/<id:image_id>/thumbnail")
@require_scope("read")
def thumbnail(image_id: int) -> Response:
    return _rendition(image_id, "thumbnail")


@bp.get("/images/<id:image_id>/preview")
@require_scope("read")
def preview(image_id: int) -> Response:
    return _rendition(image_id, "preview")


# ---------------------------------------------------------------- alt text: decisions and review


@bp.post("/images/<id:image_id>/alt-text")
@require_scope("write")
def decide(image_id: int) -> Response:
    """Approve, edit or mark decorative, by the rules of PATCH /v1/images/<id>/alt-text; then back
    to the image, or on to the next image of the review queue."""
    state = request.form.get("state", "")
    text = request.form.get("text") if state == "edited" else None
    review = request.form.get("return_to") == "review"
    back = redirect(url_for("web.review") if review else url_for("web.image_page", image_id=image_id), 303)
    db = get_session()
    browse.image(db, image_id, g.tenant)  # another tenant's image is a 404, whatever the form says
    try:
        view = alttext.decide(db, image_id, state, text, g.principal, g.tenant)
    except (InvalidRequest, Conflict) as e:  # a person's slip: say it on the page they came from
        flash(e.message, "error")
        return back
    db.commit()
    flash(f"Image {image_id}: alt text {DECIDED[state]}.", "success")
    for warning in view["warnings"]:
        flash(f"Image {image_id}: the alt text {warning}.", "warning")
    return back


@bp.get("/review")
@require_scope("read")
def review() -> str:
    """The most doubtful image whose alt text waits for review (the next after `after` in the
    queue's order, when that one was skipped)."""
    db = get_session()
    after = _number_arg("after")
    waiting = browse.review_queue(db, g.tenant, 2, after)  # this one, and whether another follows
    image = queries.image_view(db, waiting[0], services().model_version, tenant=g.tenant) if waiting else None
    return render_template("review.html", image=image, skipped=after is not None, has_next=len(waiting) > 1,
                           nav="review")


# ---------------------------------------------------------------- uploads and batches


@bp.route("/upload", methods=["GET", "POST"])
@require_scope({"GET": "read", "POST": "write"})
def upload() -> Any:
    """One photo goes to its page; several become a batch, whose progress page follows them."""
    if request.method != "POST":  # GET, or HEAD (GET without the body)
        return render_template("upload.html", nav="upload")
    files = [f for f in request.files.getlist("files") if f.filename]
    if not files:
        return render_template("upload.html", nav="upload", errors=["Choose one or more photos to upload."]), 400
    svc = services()
    images, refused = [], []
    for f in files:
        try:
            images.append(jobs.stored_upload(svc.settings, f.read(), f.filename))
        except InvalidImage as e:
            refused.append(f"{f.filename}: {e.message}")
    if not images:
        return render_template("upload.html", nav="upload", errors=refused), 422
    for message in refused:
        flash(f"Not uploaded: {message}", "error")
    version = svc.current_model_version()
    # the interactive queue: a person is waiting for these, as for an API upload
    source = None if len(images) == 1 else f"{len(images)} uploads"
    batch_id, submitted = jobs.submit_images(svc.sessionmaker, images, version, "interactive", svc.publish,
                                             batch_source=source, tenant=g.tenant)
    if batch_id is None:
        return _see_other("web.image_page", image_id=submitted[0].image_id)
    return _see_other("web.batch_page", batch_id=batch_id)


@bp.post("/batches/<id:batch_id>/retry")
@require_scope("write")
def retry_batch(batch_id: int) -> Response:
    """The *Retry failed* button: the batch's failed jobs back to the queue, then its page again."""
    db = get_session()
    queries.batch_view(db, batch_id, g.tenant)  # another tenant's batch is a 404, whatever the form says
    retried = queries.retry_failed(db, g.tenant, batch_id=batch_id)
    db.commit()
    services().publish(retried)
    flash(f"{len(retried)} failed images queued again." if retried else "No failed image to retry.", "success")
    return _see_other("web.batch_page", batch_id=batch_id)


@bp.post("/batches/<id:batch_id>/cancel")
@require_scope("write")
def cancel_batch(batch_id: int) -> Response:
    """The *Cancel* button: the batch's queued images fail with code cancelled, then its page again."""
    db = get_session()
    cancelled = core_batches.cancel(db, batch_id, g.tenant)  # another tenant's batch is a 404
    db.commit()
    flash(f"{cancelled} queued images cancelled; those being captioned finish." if cancelled else
          "Nothing left to cancel: no image of this batch is queued.", "success")
    return _see_other("web.batch_page", batch_id=batch_id)


@bp.get("/batches")
@require_scope("read")
def batches() -> str:
    db = get_session()
    views = [queries.batch_view(db, batch_id, g.tenant) for batch_id in browse.batches(db, g.tenant, 50)]
    return render_template("batches.html", batches=views, nav="batches")


@bp.get("/batches/<id:batch_id>")
@require_scope("read")
def batch_page(batch_id: int) -> str:
    db = get_session()
    batch = queries.batch_view(db, batch_id, g.tenant)
    status = request.args.get("status") or None
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}")
    page = browse.images(db, g.tenant, PAGE, before=_number_arg("before"), after=_number_arg("after"),
                         batch_id=batch_id, status=status)
    # the failures with their code and message, above the cards (which name the code alone)
    failed = core_batches.images(db, batch_id, g.tenant, "failed", FAILURES + 1)
    return render_template("batch.html", batch=batch, page=page, status=status, statuses=STATUSES,
                           failed=failed[:FAILURES], more_failed=len(failed) > FAILURES, nav="batches")
