"/v1/batches: many S3 images at once (a prefix or a list), and progress counts."
from concurrent.futures import ThreadPoolExecutor

from flask import Blueprint, Response, g, jsonify, url_for

from core import jobs, queries, storage
from core.errors import InvalidRequest

from . import bodies, get_session, services
from .auth import check_s3, require_scope

bp = Blueprint("batches", __name__, url_prefix="/v1/batches")


@bp.post("")
@require_scope("write")
def submit_batch() -> tuple[Response, int, dict]:
    svc = services()
    body = bodies.json_object(("s3", "images", "queue"))
    if "s3" in body and "images" in body:
        raise InvalidRequest("send either s3 (a prefix) or images (a list), not both")
    queue = bodies.queue(body.get("queue", "backfill"))  # a library import must not delay single uploads
    if "s3" in body:
        bucket, prefix = bodies.s3_location(body["s3"], "s3", "prefix", allow_empty=True)
        check_s3([(bucket, prefix)])
        found = storage.list_prefix(bucket, prefix, svc.settings.s3_prefix_limit)
        if not found:
            raise InvalidRequest(f"no images under s3://{bucket}/{prefix}", code="empty_batch")
        images, source = [jobs.s3_image(o) for o in found], f"s3://{bucket}/{prefix}"
    elif "images" in body:
        locations = bodies.image_list(body["images"])
        check_s3(locations)
        # head each object (concurrently): it checks it exists and gives the ETag the identity rests on
        with ThreadPoolExecutor(max_workers=svc.settings.io_threads) as pool:
            images = [jobs.s3_image(o) for o in pool.map(lambda loc: storage.head(*loc), locations)]
        source = f"{len(locations)} images"
    else:
        raise InvalidRequest('send {"s3": {"bucket": B, "prefix": P}} or {"images": [{"s3": {...}}, ...]}')
    version = svc.current_model_version()
    batch_id, submitted = jobs.submit_images(svc.sessionmaker, images, version, queue, svc.publish,
                                             batch_source=source, tenant=g.tenant)
    location = url_for("batches.get_batch", batch_id=batch_id)
    total = len({s.image_id for s in submitted})  # the same object listed twice is one image
    return jsonify({"id": batch_id, "total": total, "url": location}), 202, {"Location": location}


@bp.get("/<id:batch_id>")
@require_scope("read")
def get_batch(batch_id: int) -> Response:
    return jsonify(queries.batch_view(get_session(), batch_id, tenant=g.tenant))
