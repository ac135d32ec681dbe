"""Storage against a real S3 server (SeaweedFS) and a local folder."""
import pytest

from core import storage
from core.errors import AccessDenied, InvalidRequest, NotFound, TooLarge


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
    found = storage.list_prefix(bucket, "listing/", limit=10)
    assert [o.key for o in found] == ["listing/a.jpg", "listing/b.JPEG"]
    assert storage.head(bucket, "listing/a.jpg").etag == found[0].etag
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
    with pytest.raises(InvalidRequest) as e:  # boto3 will not send it: the caller's mistake, not an outage
        storage.head("not a bucket", "x.jpg")
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
