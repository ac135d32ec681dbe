"""ORM tables ("models" would clash with model/). The database is the truth; the broker a doorbell."""
from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from .db import Base

STATUSES = ("queued", "processing", "done", "failed")
QUEUES = ("interactive", "backfill")  # a single upload must not wait behind a library import
OUTBOX_STATUSES = ("pending", "delivered", "given_up")
DECISIONS = ("approved", "edited", "decorative")  # alt-text states only a person sets
Json = JSON().with_variant(JSONB(), "postgresql")
# The search index over captions is built by migration b1d2search01 and read by core/search.py
# alone, not mapped here: a generated tsvector column + GIN index on PostgreSQL, an FTS5 table
# kept by triggers on SQLite. Alembic's comparison skips these names (migrations/env.py).
SEARCH_INDEX_NAMES = frozenset({
    "search_vector", "ix_captions_search_vector",  # PostgreSQL
    *(f"captions_fts{part}" for part in ("", "_data", "_idx", "_content", "_docsize", "_config")),  # SQLite
})


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Image(Base):
    """Where one image's bytes are. Same tenant + same fingerprint = the same image."""
    __tablename__ = "images"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), default="default")
    uri: Mapped[str] = mapped_column(Text)  # s3://bucket/key or file:///abs/path, read by the worker
    # an upload's file name, sanitised (storage.upload_name): its source and export key; the first
    # name wins when the same bytes come again (they are the same image)
    name: Mapped[str | None] = mapped_column(String(255))
    # sha256:<hex> when we have seen the bytes; s3:<bucket>/<key>@<etag> for an S3 object we only listed
    fingerprint: Mapped[str] = mapped_column(String(1100))
    sha256: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int | None] = mapped_column(BigInteger)
    width: Mapped[int | None]  # filled in when a worker decodes it
    height: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (
        UniqueConstraint("tenant", "fingerprint"),
        # a tenant's pages, newest first: without it, a tenant whose 1,000 images are older than
        # another's 199,000 waited 24 ms per gallery page (PostgreSQL), growing with every upload
        Index("ix_images_tenant_id", "tenant", "id"),
    )

    def __repr__(self) -> str:
        return f"<Image {self.id} {self.uri}>"


class Job(Base):
    """Captioning one image with one model version; its status is the image's status."""
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    model_version: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    queue: Mapped[str] = mapped_column(String(32), default="interactive")
    attempts: Mapped[int] = mapped_column(default=0)  # claims so far; bounded by max_attempts
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # when the model forward holding it began: a claimed job without it is leased (no other worker
    # takes it) but still waits its turn in the batch, and progress shows it as queued
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    callback_url: Mapped[str | None] = mapped_column(Text)  # POSTed an event when the job is done or failed
    # the errors of the runs before each retry, oldest first: [{"code", "message", "attempts", "at"}]
    error_history: Mapped[list | None] = mapped_column(Json)
    claim_size: Mapped[int | None]  # jobs in the batch a worker is captioning it in
    batch_limit: Mapped[int | None]  # the largest batch it may go in, halved each time a worker dies with it
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    __table_args__ = (
        UniqueConstraint("image_id", "model_version"),  # submitting twice does no work twice
        CheckConstraint(f"status IN {STATUSES}", name="status"),
        Index("ix_jobs_status_queue", "status", "queue"),  # claim and sweep scan by status
        # queue depth and the oldest queued job per queue, for /readyz and /metrics on every probe:
        # a scan of the queued rows' index entries alone, never of done or failed ones
        Index("ix_jobs_queued_queue_created_at", "queue", "created_at",
              postgresql_where=text("status = 'queued'"), sqlite_where=text("status = 'queued'")),
    )

    def __repr__(self) -> str:
        return f"<Job {self.id} image={self.image_id} {self.status}>"


class Batch(Base):
    """A group of images submitted together (an S3 prefix or a list), for progress counts."""
    __tablename__ = "batches"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), default="default")
    model_version: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(Text)  # e.g. s3://bucket/prefix, or "3 images"
    total: Mapped[int]
    callback_url: Mapped[str | None] = mapped_column(Text)  # POSTed an event per image done or failed
    # "sidecar": the worker writes each S3 image's caption as an XMP object beside it (core/metadata.py)
    write_metadata: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    def __repr__(self) -> str:
        return f"<Batch {self.id} {self.source} total={self.total}>"


class BatchImage(Base):
    """Membership, not ownership: a deduplicated image may belong to several batches."""
    __tablename__ = "batch_images"
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    # finding an image's batches (for their callbacks) must not scan every batch's members
    __table_args__ = (Index("ix_batch_images_image_id", "image_id"),)


class Caption(Base):
    __tablename__ = "captions"
    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    model_version: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text)
    alt_text: Mapped[str] = mapped_column(Text)
    candidates: Mapped[list] = mapped_column(Json)  # [[text, score], ...] best first
    tags: Mapped[list] = mapped_column(Json)  # [[label, score], ...]
    confidence: Mapped[float] = mapped_column(Float)
    # the estimated probability that the caption is right (model/quality.py); None when the
    # checkpoint that wrote it had no fitted estimator
    quality: Mapped[float | None] = mapped_column(Float)
    needs_review: Mapped[bool]
    forward_size: Mapped[int]  # images in the model forward that produced it: batching, observed
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (UniqueConstraint("image_id", "model_version"),)  # one per image and model

    def __repr__(self) -> str:
        return f"<Caption image={self.image_id} {self.text!r}>"


# the review queue's order over flagged captions (core/browse.py: _review_order): a page of the
# queue reads a few entries instead of sorting every flagged caption (100k images, half flagged,
# PostgreSQL on a busy 2-core host: 2-16 ms a page, 90-180 ms without it)
Index("ix_captions_review", Caption.quality.is_(None), func.coalesce(Caption.quality, Caption.confidence),
      Caption.image_id, postgresql_where=Caption.needs_review,
      sqlite_where=text("needs_review = 1"))  # SQLite matches a partial index by the query's own text


SCOPES = ("read", "write", "admin")  # each includes the ones before it


class ApiKey(Base):
    """A tenant's API key. Only its sha256 is stored: the key itself is shown once, at creation."""
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200), default="")
    prefix: Mapped[str] = mapped_column(String(16), unique=True)  # the public part: finds the row
    hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the whole key
    scopes: Mapped[str] = mapped_column(String(64))  # space-separated, as in OAuth: "read write"
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # web sessions signed in with this key carry the generation they began in; signing out adds
    # one, so every copy of every such session cookie stops working at once
    session_generation: Mapped[int] = mapped_column(default=0, server_default="0")

    def __repr__(self) -> str:  # never the hash
        return f"<ApiKey {self.id} {self.tenant} {self.prefix} {self.scopes}>"


class TenantBucket(Base):
    """An S3 bucket (and key prefix) a tenant may submit images from; nothing else is readable to it."""
    __tablename__ = "tenant_buckets"
    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket: Mapped[str] = mapped_column(String(255), primary_key=True)
    prefix: Mapped[str] = mapped_column(String(1024), primary_key=True, default="")  # "" = the whole bucket
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    def __repr__(self) -> str:
        return f"<TenantBucket {self.tenant} s3://{self.bucket}/{self.prefix}>"


class AltTextDecision(Base):
    """A person's alt-text decision, never overwritten: the latest one is the image's alt text,
    whatever model captions it later; the rows are its history."""
    __tablename__ = "alt_text_decisions"
    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text)  # "" for decorative: alt=""
    model_version: Mapped[str | None] = mapped_column(String(64))  # the suggestion it approved or replaced
    decided_by: Mapped[str] = mapped_column(String(200))
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (CheckConstraint(f"state IN {DECISIONS}", name="state"),)

    def __repr__(self) -> str:
        return f"<AltTextDecision image={self.image_id} {self.state}>"


class WebhookDelivery(Base):
    """One attempt to POST one event: every try is kept, failed or not."""
    __tablename__ = "webhook_deliveries"
    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[str] = mapped_column(String(64), index=True)  # the same on every retry of one event
    event: Mapped[str] = mapped_column(String(32))  # image.done, image.failed
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    url: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int]
    status_code: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    def __repr__(self) -> str:
        return f"<WebhookDelivery {self.event_id} attempt={self.attempt} {self.status_code or self.error}>"


class WebhookEvent(Base):
    """The outbox: one event to POST to one callback URL, written in the transaction that finished
    its job, so it cannot be lost between that commit and the broker. Delivery tasks claim it by
    moving due_at past their attempt; the sweep re-sends a pending row left due (a lost message)."""
    __tablename__ = "webhook_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[str] = mapped_column(String(64))  # the receiver's deduplication key
    event: Mapped[str] = mapped_column(String(32))  # image.done, image.failed
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    url: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)  # the JSON as of the job's end, sent unchanged on every attempt
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    due_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (
        CheckConstraint(f"status IN {OUTBOX_STATUSES}", name="status"),
        Index("ix_webhook_events_status_due_at", "status", "due_at"),  # the sweep's scan
    )

    def __repr__(self) -> str:
        return f"<WebhookEvent {self.event_id} {self.status} attempts={self.attempts}>"


class ServiceSecret(Base):
    """A secret the service made for itself, shared by every process through the database: the key
    that signs web sessions when CAPTIONER_SECRET_KEY is unset (one row, made by the first process)."""
    __tablename__ = "service_secrets"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    def __repr__(self) -> str:  # never the value
        return f"<ServiceSecret {self.name}>"


class MetadataWrite(Base):
    """A file captioner embedded a caption into, by its bytes afterwards: the file no longer has
    the sha256 it was captioned with, and this is how a later run still knows it for the same photo."""
    __tablename__ = "metadata_writes"
    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    model_version: Mapped[str] = mapped_column(String(64))
    written_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    def __repr__(self) -> str:
        return f"<MetadataWrite image={self.image_id} {self.path}>"


class WorkerBeat(Base):
    """A running worker process's heartbeat, written every few seconds by the worker itself: the
    database, not the broker, so the API and `captioner status` see workers (and their absence)
    with one query, and nothing waits on a broadcast that no worker answers. A worker stopped
    cleanly deletes its row; a killed one's row ages out (CAPTIONER_WORKER_TIMEOUT_SECONDS)."""
    __tablename__ = "worker_beats"
    hostname: Mapped[str] = mapped_column(String(255), primary_key=True)  # Celery's node name, e.g. celery@gpu1
    pid: Mapped[int] = mapped_column(primary_key=True)
    queues: Mapped[str] = mapped_column(String(255))  # the queues it consumes, comma-separated
    model_version: Mapped[str | None] = mapped_column(String(64))  # None: a webhooks worker captions nothing
    runtime: Mapped[str | None] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_beat: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    def __repr__(self) -> str:
        return f"<WorkerBeat {self.hostname} pid={self.pid} {self.queues}>"
