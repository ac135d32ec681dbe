"""/v1/batches: many S3 images at once (a prefix or a list), progress counts, the images of a batch
by status (failures with their code and message), retrying and cancelling."""
from concurrent.futures import ThreadPoolExecutor

from flask import Blueprint, Response, g, jsonify, request, url_for

from captioner.core import backfill, batches, jobs, queries, storage
from captioner.core.errors import InvalidRequest

from . import MAX_ID, bodies, get_session, services
from .auth import check_s3, require_scope

bp = Blueprint("batches", __name__, url_prefix="/v1/batches")

MAX_LIMIT = 100  # items per page of the lists; page on with offset and next_offset, as in /v1/search


def _page() -> tuple[int, int]:
    """(limit, offset) of a list request."""
    return bodies.int_arg("limit", 20, 1, MAX_LIMIT), bodies.int_arg("offset", 0, 0, MAX_ID)


def _next_offset(rows: list, limit: int, offset: int) -> int | None:
    """One row more than asked says whether there is a next page."""
    return offset + limit if len(rows) > limit and offset + limit <= MAX_ID else None


@bp.get("")
@require_scope("read")
def list_batches() -> Response:
    """The tenant's batches, newest first."""
    limit, offset = _page()
    rows = batches.listing(get_session(), g.tenant, limit + 1, offset)
    items = [{**b, "url": url_for("batches.get_batch", batch_id=b["id"])} for b in rows[:limit]]
    return jsonify({"batches": items, "next_offset": _next_offset(rows, limit, offset)})


@bp.post("")
@require_scope("write")
def submit_batch() -> tuple[Response, int, dict]:
    svc = services()
    tenant = g.tenant
    body = bodies.json_object(("s3", "images", "queue", "callback_url", "write_metadata"))
    if "s3" in body and "images" in body:
        raise InvalidRequest("send either s3 (a prefix) or images (a list), not both")
    queue = bodies.queue(body.get("queue", "backfill"))  # a library import must not delay single uploads
    callback_url = bodies.callback_url(body.get("callback_url"), svc.settings)
    write_metadata = bodies.write_metadata(body["write_metadata"]) if "write_metadata" in body else None
    if "s3" in body:
        bucket, prefix = bodies.s3_location(body["s3"], "s3", "prefix", allow_empty=True)
        check_s3([(bucket, prefix)])
        version = svc.current_model_version()
        done = backfill.enqueue_prefix(svc.sessionmaker, bucket, prefix, version, queue, svc.publish,
                                       svc.settings.s3_prefix_limit, svc.settings.max_upload_bytes, tenant,
                                       callback_url, write_metadata, svc.settings.s3_sniff == "unnamed")
        batch_id, total = done.batch_id, done.total
        extra = {"new_jobs": done.new_jobs, "truncated": done.truncated, "skipped": done.skipped.as_dict()}
    elif "images" in body:
        locations = bodies.image_list(body["images"])
        check_s3(locations)
        # head each object (concurrently): it checks it exists and gives the ETag the identity rests on
        with ThreadPoolExecutor(max_workers=svc.settings.io_threads) as pool:
            images = [jobs.s3_image(o) for o in pool.map(lambda loc: storage.head(*loc), locations)]
        version = svc.current_model_version()
        batch_id, submitted = jobs.submit_images(svc.sessionmaker, images, version, queue, svc.publish,
                                                 batch_source=f"{len(locations)} images", tenant=tenant,
                                                 callback_url=callback_url, write_metadata=write_metadata)
        total = len({s.image_id for s in submitted})  # the same object listed twice is one image
        extra = {}
    else:
        raise InvalidRequest('send {"s3": {"bucket": B, "prefix": P}} or {"images": [{"s3": {...}}, ...]}')
    location = url_for("batches.get_batch", batch_id=batch_id)
    return jsonify({"id": batch_id, "total": total, "url": location, **extra}), 202, {"Location": location}


@bp.get("/<id:batch_id>")
@require_scope("read")
def get_batch(batch_id: int) -> Response:
    return jsonify(queries.batch_view(get_session(), batch_id, g.tenant))


@bp.get("/<id:batch_id>/images")
@require_scope("read")
def batch_images(batch_id: int) -> Response:
    """The batch's images (those with ?status=, if given), oldest first: failures with their code
    and message, captions of the done ones."""
    limit, offset = _page()
    status = request.args.get("status")  # "" is no status: a 400, as the document says
    rows = batches.images(get_session(), batch_id, g.tenant, status, limit + 1, offset)
    items = [{**i, "url": url_for("images.get_image", image_id=i["id"])} for i in rows[:limit]]
    return jsonify({"batch_id": batch_id, "status": status, "images": items,
                    "next_offset": _next_offset(rows, limit, offset)})


@bp.post("/<id:batch_id>/cancel")
@require_scope("write")
def cancel_batch(batch_id: int) -> Response:
    """The batch's queued jobs fail with code `cancelled`; those being captioned finish. Idempotent."""
    db = get_session()
    cancelled = batches.cancel(db, batch_id, g.tenant)
    db.commit()
    return jsonify({"cancelled": cancelled, "url": url_for("batches.get_batch", batch_id=batch_id)})


@bp.post("/<id:batch_id>/retry")
@require_scope("write")
def retry_batch(batch_id: int) -> tuple[Response, int]:
    """Failed jobs of the batch back to the queue (optionally those that failed with one error code),
    with a fresh attempt count; their errors stay in their history."""
    db = get_session()
    queries.batch_view(db, batch_id, g.tenant)  # another tenant's batch is a 404, whatever the body
    body = bodies.json_object(("error",)) if request.content_length else {}  # a body is optional
    code = body.get("error")
    if code is not None and not isinstance(code, str):
        raise InvalidRequest("error must be an error code, e.g. too_many_attempts")
    retried = queries.retry_failed(db, g.tenant, batch_id=batch_id, error_code=code)
    db.commit()
    services().publish(retried)
    return jsonify({"retried": len(retried), "url": url_for("batches.get_batch", batch_id=batch_id)}), 202
