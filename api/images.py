"""/v1/images: submit one image (upload or S3 reference) and read its caption."""
from flask import Blueprint, Response, g, jsonify, request, url_for
from werkzeug.exceptions import UnsupportedMediaType

from captioner.core import jobs, queries, storage
from captioner.core.errors import Conflict, InvalidRequest

from . import bodies, get_session, services
from .auth import check_s3, require_scope

bp = Blueprint("images", __name__, url_prefix="/v1/images")


def _accepted(sub: queries.Submitted, model_version: str) -> tuple[Response, int, dict]:
    location = url_for("images.get_image", image_id=sub.image_id)
    body = {"id": sub.image_id, "status": sub.status, "queue": sub.queue, "model_version": model_version,
            "url": location}
    # 202: work was accepted; 200: the same bytes were already captioned (or failed) by this model
    return jsonify(body), 202 if sub.status in ("queued", "processing") else 200, {"Location": location}


@bp.post("")
@require_scope("write")
def submit_image() -> tuple[Response, int, dict]:
    svc = services()
    if request.mimetype == "multipart/form-data":
        data, filename = bodies.upload()  # an empty file is an invalid image (422), as it is for the worker
        queue = bodies.queue(request.form.get("queue", "interactive"))
        callback_url = bodies.callback_url(request.form.get("callback_url"), svc.settings)
        version = svc.current_model_version()
        sub = jobs.submit_upload(svc.sessionmaker, svc.settings, data, version, queue, svc.publish,
                                 g.tenant, callback_url, filename)
        return _accepted(sub, version)
    if not request.is_json:
        raise UnsupportedMediaType("send the image as multipart/form-data (field 'file') or an S3 object as "
                                   f"application/json, not {request.mimetype or 'nothing'}")
    body = bodies.json_object(("s3", "queue", "callback_url"))
    if "s3" not in body:
        raise InvalidRequest('send a multipart field "file", or JSON {"s3": {"bucket": B, "key": K}}')
    bucket, key = bodies.s3_location(body["s3"], "s3", "key")
    queue = bodies.queue(body.get("queue", "interactive"))
    check_s3([(bucket, key)])
    callback_url = bodies.callback_url(body.get("callback_url"), svc.settings)
    version = svc.current_model_version()
    image = jobs.s3_image(storage.head(bucket, key))
    _, [sub] = jobs.submit_images(svc.sessionmaker, [image], version, queue, svc.publish,
                                  tenant=g.tenant, callback_url=callback_url)
    return _accepted(sub, version)


@bp.get("/<id:image_id>")
@require_scope("read")
def get_image(image_id: int) -> Response:
    # the job of the model this API submits for, if the image has one; its latest job otherwise
    return jsonify(queries.image_view(get_session(), image_id, services().model_version, tenant=g.tenant))


@bp.post("/<id:image_id>/retry")
@require_scope("write")
def retry_image(image_id: int) -> tuple[Response, int]:
    """The image's failed job back to the queue with a fresh attempt count (its error is kept in its
    history); 409 when it has none."""
    svc, db = services(), get_session()
    queries.image_view(db, image_id, svc.model_version, tenant=g.tenant)  # another tenant's image is a 404
    retried = queries.retry_failed(db, g.tenant, image_id=image_id)
    if not retried:
        raise Conflict(f"image {image_id} has no failed job to retry", code="not_failed")
    db.commit()
    svc.publish(retried)
    return jsonify(queries.image_view(db, image_id, svc.model_version, tenant=g.tenant)), 202
