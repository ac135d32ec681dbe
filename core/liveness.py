"""Is anyone working the queues? Workers' heartbeats, the jobs table and the webhook outbox, read in
three queries, for /readyz, the API's /metrics and `captioner status`: a stopped fleet shows as jobs
queued (or webhook events pending) with no live worker, whether or not any worker is left to export
metrics itself.

Heartbeat times are the writers' clocks, compared with the reader's: the hosts' clocks must agree
(NTP), as they must for the job leases already."""
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import case, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from .queue import WEBHOOK_QUEUE
from .tables import QUEUES, Job, WebhookEvent, WorkerBeat, utcnow

FAILURE_WINDOW = timedelta(hours=1)  # "failed lately" in `captioner status`
LOST_KEPT = timedelta(hours=1)  # a killed worker's row is listed as lost this long, then the sweep deletes it


@dataclass(frozen=True)
class Worker:
    hostname: str
    pid: int
    queues: tuple[str, ...]
    model_version: str | None
    runtime: str | None
    started_at: datetime
    last_beat: datetime
    seconds_since_beat: float
    live: bool


@dataclass(frozen=True)
class QueueState:
    queued: int = 0
    oldest_seconds: float = 0.0  # age of the oldest queued job since it was submitted; 0 when none
    workers: int = 0  # live workers consuming it


@dataclass(frozen=True)
class Failures:
    total: int  # failed jobs now (a retried job leaves the count)
    last_hour: int  # those that failed within FAILURE_WINDOW


@dataclass(frozen=True)
class Report:
    queues: dict[str, QueueState]
    workers: list[Worker]
    failures: dict[str, Failures] = field(default_factory=dict)
    webhooks: QueueState = QueueState()  # events pending in the outbox, and the live workers delivering them

    def consumers(self, queue: str) -> int:
        """Live workers consuming `queue` (any broker queue, the webhooks one included)."""
        return consumers(self.workers, queue)

    def stalled(self) -> list[str]:
        """Queues holding jobs (or, for the webhooks queue, pending events) that no live worker
        consumes: they will wait for ever."""
        found = {**self.queues, WEBHOOK_QUEUE: self.webhooks}
        return [name for name, q in found.items() if q.queued and not q.workers]

    def queue(self, name: str) -> QueueState:
        return self.webhooks if name == WEBHOOK_QUEUE else self.queues[name]


def consumers(found: list[Worker], queue: str) -> int:
    return sum(1 for w in found if w.live and queue in w.queues)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)  # SQLite keeps no zone


def beat(session: Session, hostname: str, pid: int, queues: list[str], model_version: str | None,
         runtime: str | None) -> None:
    """Insert or refresh this worker's row."""
    now = utcnow()
    values = {"hostname": hostname, "pid": pid, "queues": ",".join(queues), "model_version": model_version,
              "runtime": runtime, "started_at": now, "last_beat": now}
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = insert(WorkerBeat).values(values)
    session.execute(statement.on_conflict_do_update(index_elements=["hostname", "pid"],
                                                    set_={"last_beat": now, "queues": values["queues"]}))


def leave(session: Session, hostname: str, pid: int) -> None:
    """A worker stopping cleanly: it stops counting at once, not after the timeout."""
    session.execute(delete(WorkerBeat).where(WorkerBeat.hostname == hostname, WorkerBeat.pid == pid))


def forget_lost(session: Session, now: datetime | None = None) -> int:
    """Delete the rows of workers silent for longer than LOST_KEPT (the sweep calls it)."""
    cutoff = (now or utcnow()) - LOST_KEPT
    return session.execute(delete(WorkerBeat).where(WorkerBeat.last_beat < cutoff)).rowcount


def workers(session: Session, timeout_seconds: int, now: datetime | None = None) -> list[Worker]:
    """Every worker with a row, live or lost (silent for over timeout_seconds), by name."""
    now = now or utcnow()
    rows = session.scalars(select(WorkerBeat).order_by(WorkerBeat.hostname, WorkerBeat.pid)).all()
    found = []
    for row in rows:
        since = (now - _aware(row.last_beat)).total_seconds()
        found.append(Worker(row.hostname, row.pid, tuple(row.queues.split(",")), row.model_version, row.runtime,
                            _aware(row.started_at), _aware(row.last_beat), since, since <= timeout_seconds))
    return found


def queued(session: Session, now: datetime | None = None) -> dict[str, tuple[int, float]]:
    """{queue: (jobs queued, seconds the oldest has waited)} for every job queue, in one query over
    the partial index of queued jobs."""
    now = now or utcnow()
    rows = session.execute(select(Job.queue, func.count(), func.min(Job.created_at))
                           .where(Job.status == "queued").group_by(Job.queue)).all()
    found = {name: (0, 0.0) for name in QUEUES}
    for name, count, oldest in rows:
        found[name] = (count, max(0.0, (now - _aware(oldest)).total_seconds()))
    return found


def pending_events(session: Session, now: datetime | None = None) -> tuple[int, float]:
    """(webhook events waiting in the outbox, seconds the oldest has waited since its job ended)."""
    count, oldest = session.execute(select(func.count(), func.min(WebhookEvent.created_at))
                                    .where(WebhookEvent.status == "pending")).one()
    return count, max(0.0, ((now or utcnow()) - _aware(oldest)).total_seconds()) if count else 0.0


def failures(session: Session, now: datetime | None = None) -> dict[str, Failures]:
    """Failed jobs by error code: all of them, and those of the last hour."""
    since = (now or utcnow()) - FAILURE_WINDOW
    rows = session.execute(select(Job.error_code, func.count(), func.sum(case((Job.finished_at >= since, 1), else_=0)))
                           .where(Job.status == "failed").group_by(Job.error_code)).all()
    return {code or "unknown": Failures(total, int(lately or 0)) for code, total, lately in rows}


def report(session: Session, timeout_seconds: int, with_failures: bool = False) -> Report:
    """Queues, workers, the webhook outbox and (when asked: a fourth query) failures, as of now."""
    now = utcnow()
    found = workers(session, timeout_seconds, now)
    queues = {name: QueueState(count, oldest, consumers(found, name))
              for name, (count, oldest) in queued(session, now).items()}
    webhooks = QueueState(*pending_events(session, now), consumers(found, WEBHOOK_QUEUE))
    return Report(queues, found, failures(session, now) if with_failures else {}, webhooks)
