"""celery-batches' Batches with the changes a serving worker needs.

1. Per-request task events (received, started, succeeded/failed, with the batch's runtime). celery-batches 0.11, the latest
   release, sends none, which leaves batched tasks invisible in Flower (clokep/celery-batches#70;
   PRs #34 and #82 were never released). The events are the ones Celery's own Request sends.
2. A batch goes to the pool only when a pool process is free. Upstream flushes on every timer tick
   and every N-th message, so while one batch runs, partial batches (7, 9, ...) queue up behind
   it; here the buffer keeps filling instead and the next batch leaves full when the pool frees.
3. reject_on_worker_lost: when the child dies mid-batch (OOM, signal), upstream never acks or
   rejects the messages, which then wait for Redis' visibility timeout. Here they are requeued
   once (not when already redelivered: the database's attempt counter bounds the rest).
4. A batch is counted in job ids, not requests: a backfill message carries a model batch of ids
   (core/queue.py), a single upload's message one. It leaves as soon as the buffer holds a batch
   of ids; upstream would wait for flush_every messages or the next timer tick.
5. Interactive requests leave first. A worker that consumes both queues holds up to a batch of
   backfill requests in its buffer; a single upload that arrives behind them goes into the next
   batch instead of waiting for the buffer to drain.
6. Prefetch is counted in job ids too. Celery's prefetch limit counts messages, and is set high
   enough (2 x batch size) for single uploads to fill a batch; a worker would then hold up to that
   many backfill messages of a batch each, 2,048 jobs at batch 32, and leave none to a second
   worker. While a group message is held, the channel's prefetch count shrinks by its extra ids.

7. Worker state. Celery's own requests are registered in celery.worker.state, which `celery inspect
   reserved` and `active` read; celery-batches registers none, so a worker captioning 40 images
   listed nothing. Here a request is reserved while buffered and active while its batch runs.

Meant for tasks with acks_late=True: requests are acknowledged when their batch returns. The task
returns {request id: outcome}. A single image's outcome outside SUCCEEDED (an error code) makes
that request's event task-failed, so Flower shows which images failed although their batch ran to
the end; a group's outcome is a dict of counts and succeeds; {BATCH_ERROR: {exception, traceback}}
(the batch itself broke) fails every request with that exception and traceback.
"""
import time
from typing import Any, Collection

from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError
from celery import signals
from celery.worker import state
from celery.worker.request import Request
from celery_batches import Batches as UpstreamBatches
from celery_batches import SimpleRequest
from celery_batches.trace import apply_batches_task

SUCCEEDED = ("done", "skipped", "requeued")  # captioned now, done already / claimed elsewhere, or to be tried again
BATCH_ERROR = "batch_error"  # the key of the task's result when the batch itself broke: {exception, traceback}


def request_ids(request: Any) -> list[int]:
    """The job ids one caption message rings for: {"job_id": n} or {"job_ids": [...]}."""
    return request.kwargs.get("job_ids") or [request.kwargs["job_id"]]


class Batches(UpstreamBatches):
    def __init__(self) -> None:
        super().__init__()
        self._in_flight = 0  # batches handed to the pool and not yet returned
        self._consumer: Any = None  # its .qos, the prefetch count, exists only once the consumer has started
        self._withheld: dict[str, int] = {}  # request id -> prefetch slots taken back while it is held

    def Strategy(self, task: Any, app: Any, consumer: Any) -> Any:
        """Called at every consumer start, also after a lost broker connection: what was held for the
        old channel goes. Its messages were restored to the broker (or lost with it, and the sweep
        publishes their jobs again), the new channel's prefetch count starts whole, and a batch
        still in the pool must not keep the new buffer waiting: after a Redis restart the worker
        held two messages unflushed and took no other one (the fault suite's Redis restart)."""
        self._consumer = consumer
        self._withheld.clear()
        self._in_flight = 0
        strategy = super().Strategy(task, app, consumer)
        while not self._buffer.empty():
            state.task_ready(self._buffer.get_nowait())
        return strategy

    def flush(self, requests: Collection[Request]) -> Any:
        # stable sort: interactive first, each queue in arrival order
        requests = sorted(requests, key=lambda r: r.delivery_info.get("routing_key") != "interactive")
        if self._in_flight >= self._pool.limit:
            for req in requests:  # busy: keep them for a fuller batch when a process frees
                self._buffer.put(req)
            return None
        batch, ids = [], 0
        for req in requests:  # up to flush_every job ids, and at least one request
            if batch and ids + len(request_ids(req)) > self.flush_every:
                break
            batch.append(req)
            ids += len(request_ids(req))
        rest = requests[len(batch):]
        for req in rest:
            self._buffer.put(req)
        simple = ([SimpleRequest.from_request(r) for r in batch],)  # picklable for the prefork pool
        started = time.monotonic()

        def on_accepted(pid: int, time_accepted: float) -> None:
            for req in batch:
                # what Celery's Request.on_accepted records: `celery inspect active` lists the
                # requests of the batch running in that pool process
                req.worker_pid, req.time_start = pid, time.time() - (time.monotonic() - time_accepted)
                state.task_accepted(req)
                req.send_event("task-started")

        def on_return(result: dict[str, Any] | None) -> None:
            self._in_flight = max(0, self._in_flight - 1)
            runtime = time.monotonic() - started
            broke = {"exception": "batch failed", "traceback": ""} if result is None else result.get(BATCH_ERROR)
            for req in batch:
                req.acknowledge()
                self._give_back(req)
                outcome = None if result is None else result.get(req.id)
                state.task_ready(req, successful=broke is None)
                if broke is not None:
                    req.send_event("task-failed", exception=broke["exception"], traceback=broke["traceback"],
                                   runtime=runtime)
                elif isinstance(outcome, dict) or outcome in SUCCEEDED:  # a group: its task ran, see the counts
                    req.send_event("task-succeeded", result=repr(outcome), runtime=runtime)
                else:  # this request's image failed while its neighbours were captioned
                    req.send_event("task-failed", exception=str(outcome), traceback="", runtime=runtime)
            self._flush_waiting()

        def on_error(einfo: ExceptionInfo) -> None:
            self._in_flight = max(0, self._in_flight - 1)
            lost = isinstance(einfo.exception, WorkerLostError)
            for req in batch:
                if lost and self.reject_on_worker_lost and not req.delivery_info.get("redelivered"):
                    req.reject(requeue=True)
                else:
                    req.acknowledge()
                self._give_back(req)
                state.task_ready(req)
                req.send_event("task-failed", exception=repr(einfo.exception), traceback=str(einfo.traceback))
            self._flush_waiting()

        self._in_flight += 1
        return self._pool.apply_async(apply_batches_task, (self, simple, 0, None),
                                      accept_callback=on_accepted, callback=on_return, error_callback=on_error)

    def buffered(self, request: Request) -> None:
        """A request was just buffered: count its extra job ids against the prefetch limit, and
        flush now if a pool process is free and the buffer holds a whole batch of job ids
        (upstream counts messages, so a backfill message carrying a batch would wait for the timer)."""
        extra = len(request_ids(request)) - 1
        qos = self._consumer.qos if self._consumer is not None else None
        if extra and qos is not None and qos.value:  # 0: no limit to shrink
            taken = min(extra, qos.value - 1)  # kombu keeps a prefetch count of 1 at least
            if taken > 0:
                qos.decrement_eventually(taken)
                qos.update()  # now: the loop would apply it only after reading every waiting message
                self._withheld[request.id] = taken
        if self._in_flight < self._pool.limit:
            if sum(len(request_ids(r)) for r in list(self._buffer.queue)) >= self.flush_every:
                self._do_flush()

    def _give_back(self, request: Request) -> None:
        taken = self._withheld.pop(request.id, 0)
        if taken:
            self._consumer.qos.increment_eventually(taken)

    def _flush_waiting(self) -> None:
        # a process just freed: send what waited at once rather than at the next timer tick
        if not self._buffer.empty():
            self._do_flush()


@signals.task_received.connect
def _send_received(sender: Any = None, request: Request | None = None, **_: Any) -> None:
    # celery-batches' strategy buffers requests and skips the task-received event Celery's sends
    if request is not None and isinstance(request.task, Batches):
        state.task_reserved(request)  # `celery inspect reserved` lists what the buffer holds
        request.send_event("task-received", name=request.name, args=request.argsrepr,
                           kwargs=request.kwargsrepr, root_id=request.root_id, parent_id=request.parent_id,
                           retries=request.request_dict.get("retries", 0))
        request.task.buffered(request)
