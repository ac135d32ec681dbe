"""The HTTP API: an application factory, one blueprint per resource, one JSON error shape.
Never imports torch or worker/: it stores bytes, writes rows and publishes job ids."""
import logging
from dataclasses import dataclass
from typing import Any

from flask import Flask, current_app, g
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.routing import IntegerConverter

from core import captioner, logs
from core.db import make_engine, make_sessionmaker
from core.queue import create_celery, publish
from core.settings import Settings, get_settings


@dataclass
class Services:
    """What the request handlers share; built once per app by create_app."""
    settings: Settings
    sessionmaker: sessionmaker
    celery: Any | None  # None in embedded mode: jobs wait for `captioner caption` to drain them
    # read lazily: the API can start, and say why it is not ready, without a checkpoint
    model_version: str | None = None

    def current_model_version(self) -> str:
        if self.model_version is None:
            self.model_version = captioner.version(self.settings)
        return self.model_version

    def publish(self, jobs: list[tuple[int, str]]) -> None:
        if self.celery is not None:
            publish(self.celery, jobs, group=captioner.batch_size(self.settings))


MAX_ID = 2**31 - 1  # row ids are PostgreSQL INTEGER columns


class RowId(IntegerConverter):
    """`<id:...>`: 1..MAX_ID. A larger number names no row, and SQLAlchemy binds it as `%s::INTEGER`,
    which PostgreSQL refuses (integer out of range, a 500): it is a routing 404 like any missing id."""

    def __init__(self, url_map: Any) -> None:
        super().__init__(url_map, min=1, max=MAX_ID)


def services() -> Services:
    return current_app.extensions["captioner"]


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
    app = Flask(__name__)
    app.url_map.converters["id"] = RowId
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes  # Flask answers 413 before reading more
    # keep fields in the documented order
    app.json.sort_keys = False  # type: ignore[attr-defined]
    celery = create_celery(settings) if settings.broker_url else None
    app.extensions["captioner"] = Services(settings, make_sessionmaker(make_engine(settings.database_url)), celery)
    app.teardown_appcontext(_close_session)

    from . import alttext, auth, batches, docs, errors, export, health, images, metrics, search
    errors.init_app(app)
    metrics.init_app(app)
    if settings.log_format == "json":
        logs.use_format(logging.getLogger(), "json")
    auth.init_app(app, settings)
    for module in (images, alttext, batches, search, export, health, docs):
        app.register_blueprint(module.bp)
    return app
