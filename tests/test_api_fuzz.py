"""Schemathesis fuzzes every operation of the OpenAPI document against the real app (PostgreSQL,
S3): no 5xx, and every status, header, content type and body must match what the document says.
Both generation modes run: schema-valid requests must not be refused with a 400, and requests
that break the document (wrong types, unknown fields, missing fields) must be refused with a 4xx.
Every /v1 operation is called with an API key, and must refuse the same call without one.
Bounded and derandomized (the same cases every run): about 650 requests in about 10 seconds."""
import io

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from PIL import Image

from captioner.api.docs import SPEC
from conftest import keyed, make_key

# The key is sent with every call (headers=): left to the fuzzer, a missing Authorization header
# would count as invalid data that our key then makes valid. The `ignored_auth` check still sends
# probes without a key and with a wrong one, and requires them to be refused (ST401 otherwise).
# A schema-valid upload is any bytes, and most bytes are not an image: there a 422 is the right
# answer to valid data, so it is accepted for that operation alone.
CONFIG = schemathesis.config.SchemathesisConfig.from_str("""
[generation]
with-security-parameters = false

[[operations]]
include-name = "POST /v1/images"
checks.positive_data_acceptance.expected-statuses = ["2xx", "403", "404", "422"]
""")
# from the document itself, not a fixture: schemathesis' lazy fixture loader breaks on pytest 9
schema = schemathesis.openapi.from_dict(SPEC, config=CONFIG)


@pytest.fixture(scope="module")
def fuzz_app(own_pg_url, s3, tmp_path_factory):
    from captioner.api import create_app
    from captioner.core import storage
    from captioner.core.settings import Settings

    checkpoint = tmp_path_factory.mktemp("fuzz") / "fake.pt"
    checkpoint.write_bytes(b"not really a checkpoint")  # only its hash (the model version) is read
    bucket = s3["S3_TEST_BUCKET"]
    # its own database: the jobs it queues are never run, and the pipeline tests count jobs
    app = create_app(Settings(database_url=own_pg_url, storage=f"s3://{bucket}/uploads", model_path=str(checkpoint),
                              rate_limit="1000000/minute"))  # the fuzzer's 650 requests must not meet 429s
    # batch 1 and its images exist, so the small ids the fuzzer tries first also reach the 200 schemas
    for name in ("a.png", "b.png"):
        out = io.BytesIO()
        Image.new("RGB", (8, 8), name[0].encode()[0]).save(out, "PNG")
        storage.s3_client().put_object(Bucket=bucket, Key=f"fuzz-seed/{name}", Body=out.getvalue())
    # a key that may read the test bucket: the fuzzer reaches S3, not only the allow-list's 403
    key = make_key(own_pg_url, buckets=(f"s3://{bucket}",))
    seeded = keyed(app, key).post("/v1/batches", json={"s3": {"bucket": bucket, "prefix": "fuzz-seed/"}})
    assert seeded.status_code == 202, seeded.get_json()
    return app, key


@schema.parametrize()
@settings(max_examples=100, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_conforms_to_the_document(case, fuzz_app):
    app, key = fuzz_app
    # on the schema too, not only on this call: the auth check's probes (no key, a wrong key) go through it
    case.operation.schema.app = app
    case.call_and_validate(app=app, headers={"Authorization": f"Bearer {key}"})
