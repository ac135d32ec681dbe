"""The HTTP API and the web interface: an application factory, one blueprint per resource, one
JSON error shape (HTML pages for the web interface). Never imports torch or worker/: it stores
bytes, writes rows and publishes job ids."""
import logging
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from flask import Flask, current_app, g
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.routing import IntegerConverter

from captioner.core import captioner, logs
from captioner.core.auth import web_session_secret
from captioner.core.db import make_engine, make_sessionmaker
from captioner.core.queue import Publish, create_celery, publisher
from captioner.core.settings import Settings, get_settings


@dataclass
class Services:
    """What the request handlers share; built once per app by create_app."""
    settings: Settings
    sessionmaker: sessionmaker
    celery: Any | None  # None in embedded mode: jobs wait for `captioner caption` to drain them
    publish: Publish
    # read lazily: the API can start, and say why it is not ready, without a checkpoint
    model_version: str | None = None
    # read lazily too: without a database the API starts and /readyz says why it is not ready
    session_key: str | None = None

    def current_model_version(self) -> str:
        if self.model_version is None:
            self.model_version = captioner.version(self.settings)
        return self.model_version

    def session_secret(self) -> str:
        """CAPTIONER_SECRET_KEY, else the key the database keeps for every API process."""
        if self.session_key is None:
            if self.settings.secret_key:
                self.session_key = self.settings.secret_key
            else:
                with self.sessionmaker.begin() as s:
                    self.session_key = web_session_secret(s)
        return self.session_key


MAX_ID = 2**31 - 1  # row ids are PostgreSQL INTEGER columns


class RowId(IntegerConverter):
    """`<id:...>`: 1..MAX_ID. A larger number names no row, and SQLAlchemy binds it as `%s::INTEGER`,
    which PostgreSQL refuses (integer out of range, a 500): it is a routing 404 like any missing id."""

    def __init__(self, url_map: Any) -> None:
        super().__init__(url_map, min=1, max=MAX_ID)


class CaptionerFlask(Flask):
    """Flask, with the secret key that signs web sessions and CSRF tokens read on first use (Flask
    and Flask-WTF both read `app.secret_key`), not at start-up: see Services.session_secret."""

    @property  # type: ignore[override]
    def secret_key(self) -> str:
        return services_of(self).session_secret()


def services_of(app: Flask) -> Services:
    return app.extensions["captioner"]


def services() -> Services:
    return services_of(current_app)


def get_session() -> Session:
    """One session per request, opened on first use and closed at teardown."""
    if "session" not in g:
        g.session = services().sessionmaker()
    return g.session


def _close_session(_exc: BaseException | None) -> None:
    session = g.pop("session", None)
    if session is not None:
        session.close()


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or get_settings()
    # instance_path given: Flask's search for it fails on the captioner.* namespace of an editable
    # install, and the API keeps nothing there
    app = CaptionerFlask(__name__, instance_path=str(Path(__file__).parent / "instance"))
    app.url_map.converters["id"] = RowId
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes  # Flask answers 413 before reading more
    # keep fields in the documented order
    app.json.sort_keys = False  # type: ignore[attr-defined]
    celery = create_celery(settings) if settings.broker_url else None
    app.extensions["captioner"] = Services(settings, make_sessionmaker(make_engine(settings.database_url)), celery,
                                           publisher(settings, celery))
    app.teardown_appcontext(_close_session)

    from . import alttext, auth, batches, docs, errors, export, health, images, metrics, search, web
    errors.init_app(app)
    metrics.init_app(app)
    if settings.log_format == "json":
        logs.use_format(logging.getLogger(), "json")
    auth.init_app(app, settings)
    for module in (images, alttext, batches, search, export, health, docs):
        app.register_blueprint(module.bp)
    web.init_app(app, settings)
    return app
