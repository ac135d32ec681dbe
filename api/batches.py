"/v1/batches: many S3 images at once (a prefix or a list), and progress counts."
from concurrent.futures import ThreadPoolExecutor

from flask import Blueprint, Response, g, jsonify, request, url_for

from captioner.core import backfill, jobs, queries, storage
from captioner.core.errors import InvalidRequest

from . import bodies, get_session, services
from .auth import check_s3, require_scope

bp = Blueprint("batches", __name__, url_prefix="/v1/batches")


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
