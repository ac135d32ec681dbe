"""Storage against a real S3 server (SeaweedFS) and a local folder."""
import pytest

from captioner.core import storage
from captioner.core.errors import AccessDenied, InvalidRequest, NotFound, TooLarge


def test_local_store_is_content_addressed(tmp_path):
    uri, digest = storage.store(str(tmp_path), b"same bytes")
    again, _ = storage.store(str(tmp_path), b"same bytes")
    assert uri == again and uri.endswith(f"sha256/{digest[:2]}/{digest}")
    assert storage.read(uri, 100) == b"same bytes"
    assert len([p for p in tmp_path.rglob("*") if p.is_file()]) == 1


def test_s3_store_read_list_and_head(s3):
    bucket = s3["S3_TEST_BUCKET"]
    uri, digest = storage.store(f"s3://{bucket}/uploads", b"image bytes")
    assert uri == f"s3://{bucket}/uploads/sha256/{digest[:2]}/{digest}"
    assert storage.store(f"s3://{bucket}/uploads", b"image bytes")[0] == uri  # stored once
    assert storage.read(uri, 1000) == b"image bytes"
    for name in ("a.jpg", "b.JPEG", "notes.txt"):
        storage.s3_client().put_object(Bucket=bucket, Key=f"listing/{name}", Body=name.encode())
    found = storage.list_prefix(bucket, "listing/", limit=10)  # every object: names say nothing of content
    assert [o.key for o in found] == ["listing/a.jpg", "listing/b.JPEG", "listing/notes.txt"]
    assert storage.head(bucket, "listing/a.jpg").etag == found[0].etag
    assert storage.read_head(found[2], 3) == b"not" and storage.read_head(found[0]) == b"a.jpg"
    storage.check(f"s3://{bucket}")


def test_s3_errors_are_ours(s3):
    bucket = s3["S3_TEST_BUCKET"]
    with pytest.raises(NotFound):
        storage.read(f"s3://{bucket}/missing.jpg", 10)
    with pytest.raises(NotFound):
        storage.head(bucket, "missing.jpg")
    # a missing bucket reads as one the service may not read, by HEAD (no error body) or by listing
    for unreadable in (lambda: storage.head("no-such-bucket-here", "x.jpg"),
                       lambda: storage.list_prefix("no-such-bucket-here", "", 10),
                       lambda: storage.read("s3://no-such-bucket-here/x.jpg", 10)):
        with pytest.raises(AccessDenied) as e:
            unreadable()
        assert e.value.code == "bucket_not_readable"
    for invalid in (lambda: storage.head("not a bucket", "x.jpg"), lambda: storage.read("s3://not a bucket/x.jpg", 10)):
        with pytest.raises(InvalidRequest) as e:  # boto3 will not send it: the caller's mistake, not an outage
            invalid()
        assert e.value.code == "s3_error"
    storage.s3_client().put_object(Bucket=bucket, Key="big.jpg", Body=b"x" * 100)
    with pytest.raises(TooLarge):
        storage.read(f"s3://{bucket}/big.jpg", 50)
    with pytest.raises(InvalidRequest):
        storage.split_s3("http://example/x")
    for i in range(3):
        storage.s3_client().put_object(Bucket=bucket, Key=f"many/{i}.jpg", Body=b"x")
    with pytest.raises(InvalidRequest) as e:
        storage.list_prefix(bucket, "many/", limit=2)
    assert e.value.code == "too_many_images"
    with pytest.raises(NotFound):  # deleted since it was listed
        storage.read_head(storage.S3Object(bucket, "missing.jpg", "", 10))


def test_s3_reads_with_the_wrong_secret_are_refused_as_unreadable(s3, monkeypatch):
    uri, _ = storage.store(f"s3://{s3['S3_TEST_BUCKET']}/uploads", b"image bytes")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    storage.s3_client.cache_clear()
    try:
        with pytest.raises(AccessDenied) as e:
            storage.read(uri, 100)
        assert e.value.code == "bucket_not_readable"
    finally:
        monkeypatch.undo()
        storage.s3_client.cache_clear()


def test_s3_reads_go_through_obstore_and_odd_keys_through_boto3(s3):
    bucket = s3["S3_TEST_BUCKET"]
    client = storage.s3_client()
    keys = ["plain/photo.jpg", "ümlaut ä+b%20.jpg", "a//b.jpg"]
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    through_boto3 = []
    client.meta.events.register("before-parameter-build.s3.GetObject", lambda params, **_: through_boto3.append(params["Key"]))
    try:
        for key in keys:
            assert storage.read(f"s3://{bucket}/{key}", 100) == key.encode(), key
    finally:
        client.meta.events.unregister("before-parameter-build.s3.GetObject")
    # obstore refuses empty segments (and control characters), and would drop a trailing slash:
    # read "dir" for "dir/" (which SeaweedFS stores as a folder, so it cannot be shown here)
    assert through_boto3 == ["a//b.jpg"]


def test_s3_reads_in_a_process_forked_after_one_read(s3):
    # obstore's runtime threads do not survive a fork: the child must read through boto3, not hang
    import multiprocessing

    uri, _ = storage.store(f"s3://{s3['S3_TEST_BUCKET']}/uploads", b"forked bytes")
    assert storage.read(uri, 100) == b"forked bytes"
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        assert pool.apply_async(storage.read, (uri, 100)).get(timeout=60) == b"forked bytes"


def test_s3_keys_with_hash_or_question_marks_are_read_from_their_listing(s3):
    # S3 URIs are not URLs: "photo #1.jpg" is the whole key, not a path and a fragment
    bucket = s3["S3_TEST_BUCKET"]
    keys = ["odd/photo #1.jpg", "odd/why?.jpg", "odd/100%.jpg", "odd/a&b=c.jpg"]
    for key in keys:
        storage.s3_client().put_object(Bucket=bucket, Key=key, Body=key.encode())
    listed = storage.list_prefix(bucket, "odd/", limit=10)
    assert sorted(o.key for o in listed) == sorted(keys)
    for obj in listed:
        assert storage.split_s3(obj.uri) == (bucket, obj.key)
        assert storage.read(obj.uri, 100) == obj.key.encode()


def _jpeg(size: tuple[int, int] = (8, 6)) -> bytes:
    import io

    from PIL import Image
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, "JPEG")
    return out.getvalue()


# photos whose names a suffix filter missed: a camera's MPO, JFIF, no extension, a renamed backup
ODD_NAMES = ("IMG_1.JPG", "b.jpeg", "c.MPO", "d.jfif", "e", "f.JPG.bak")


def test_a_prefix_is_sorted_by_content_not_by_name(s3):
    from concurrent.futures import ThreadPoolExecutor

    from captioner.core import prefixes
    bucket, client = s3["S3_TEST_BUCKET"], storage.s3_client()
    photo = _jpeg()
    objects = {**{f"mixed/{n}": photo for n in ODD_NAMES},
               "mixed/notes.jpg": b"plain text, named like a photo",
               "mixed/cut.jpg": photo[:2],  # cut before its signature ends: nothing says it is an image
               "mixed/cut-later.png": photo[:40],  # a JPEG's signature, cut mid-header: the worker names it
               "mixed/empty.jpg": b"",
               "mixed/big.jpg": photo + b"\0" * 1000,
               "mixed/.hidden.jpg": photo, "mixed/.thumbs/g.jpg": photo}
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    skipped = prefixes.Skipped()
    with ThreadPoolExecutor(4) as pool:
        page = storage.list_prefix(bucket, "mixed/", 100)
        chosen = prefixes.choose(page, "mixed/", len(photo) + 100, pool, skipped)
    assert sorted(o.key for o in chosen) == sorted([f"mixed/{n}" for n in ODD_NAMES] + ["mixed/cut-later.png"])
    assert skipped.count == 6
    assert skipped.reasons == {"not_an_image": 2, "empty": 1, "too_large": 1, "hidden": 2}
    assert {k["key"]: k["reason"] for k in skipped.keys}["mixed/notes.jpg"] == "not_an_image"
    assert skipped.summary() == "6 objects skipped (1 empty, 2 hidden, 2 not_an_image, 1 too_large)"
    # the fast path (CAPTIONER_S3_SNIFF=unnamed) takes image-named objects on their names
    named = prefixes.Skipped()
    with ThreadPoolExecutor(4) as pool:
        chosen = prefixes.choose(page, "mixed/", len(photo) + 100, pool, named, trust_suffixes=True)
    assert {"mixed/notes.jpg", "mixed/cut.jpg", "mixed/c.MPO", "mixed/e"} <= {o.key for o in chosen}
    assert named.reasons == {"empty": 1, "too_large": 1, "hidden": 2}
    with pytest.raises(InvalidRequest) as e:
        prefixes.images(bucket, "mixed/", len(photo) + 100, 3, prefixes.Skipped())
    assert e.value.code == "too_many_images"
