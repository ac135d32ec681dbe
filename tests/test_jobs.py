"""One claimed batch through core.jobs with the real model, on SQLite and a local folder."""
import io

import pytest
from PIL import Image
from sqlalchemy import select
from test_hostile_images import HOSTILE, ODD, encode, with_orientation  # a sibling: tests/ is on sys.path

from captioner.core import captioner, jobs, queries
from captioner.core.db import make_engine, make_sessionmaker
from captioner.core.settings import Settings
from captioner.core.tables import Caption, Job

# odd files that the real model captions in the same forward as the photos (the rest of ODD
# reaches the model input in tests/test_hostile_images.py); every hostile file fails alone
ODD_IN_BATCH = ["cmyk.jpg", "grey16.png", "rgba16.png", "animated.gif", "photo.webp", "photo.tiff",
                "photo.bmp", "progressive.jpg", "one-pixel.png", "wide.jpg", "tall.png"]
MAX_BYTES = 1_000_000  # every other file in the batch is smaller


# "device" decodes baseline JPEGs as a GPU worker does (nvJPEG there, libjpeg-turbo on this CPU)
# and must fail and fall back exactly as Pillow does
@pytest.mark.parametrize("jpeg_decode", ["pillow", "device"])
def test_one_bad_image_never_fails_its_neighbours(sqlite_url, tmp_path, checkpoint, photos, jpeg_decode):
    bomb = tmp_path / "bomb.png"  # a few kB on disk, 81 MP once decoded
    out = io.BytesIO()
    Image.new("1", (9000, 9000)).save(out, "PNG")
    bomb.write_bytes(out.getvalue())
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 100)
    gone = tmp_path / "gone.jpg"
    gone.write_bytes(b"soon deleted")
    liar = tmp_path / "really-a-png.jpg"  # the extension lies: only the bytes count
    liar.write_bytes(encode(Image.new("RGB", (64, 48), (0, 0, 255)), "PNG"))
    rotated = tmp_path / "exif-6.jpg"
    rotated.write_bytes(with_orientation(6))
    odd = {name: ODD[name]()[0] for name in ODD_IN_BATCH}
    hostile = {name: HOSTILE[name]() for name in HOSTILE}
    for name, data in [*odd.items(), *((n, h[0]) for n, h in hostile.items())]:
        (tmp_path / name).write_bytes(data)
    huge = tmp_path / "huge.jpg"  # over max_upload_bytes below: refused while reading, never decoded
    huge.write_bytes(b"\xff\xd8\xff\xe0" + bytes(MAX_BYTES))
    files = [photos[0], bomb, photos[1], junk, gone, liar, rotated, huge, *(tmp_path / n for n in [*odd, *hostile])]
    images = [jobs.file_image(p) for p in files]
    gone.unlink()  # deleted between submission and captioning

    settings = Settings(database_url=sqlite_url, model_path=str(checkpoint), device="cpu", max_upload_bytes=MAX_BYTES,
                        jpeg_decode=jpeg_decode, forward_size=6)
    engine = make_engine(sqlite_url)
    sm = make_sessionmaker(engine)
    version = captioner.version(settings)
    _, submitted = jobs.submit_images(sm, images, version, "backfill", lambda _: None)
    with sm.begin() as s:
        claimed = queries.claim(s, version, 60, limit=len(files))
    report = jobs.caption_claimed(sm, settings, claimed)

    good = 2 + 2 + len(odd)
    # failed images take no seat in a forward: the 15 good ones go through forwards of 6, 6 and 3
    assert (report.captioned, report.failed, report.forward_size) == (good, 4 + len(hostile), 6)
    with sm() as s:
        outcome = {j.image_id: (j.status, j.error_code) for j in s.scalars(select(Job))}
        captions = s.scalars(select(Caption)).all()
    engine.dispose()
    by_file = {f.name: outcome[x.image_id] for f, x in zip(files, submitted, strict=True)}
    assert by_file == {photos[0].name: ("done", None), photos[1].name: ("done", None),
                       "bomb.png": ("failed", "image_too_large"), "junk.jpg": ("failed", "invalid_image"),
                       "gone.jpg": ("failed", "source_not_found"), liar.name: ("done", None),
                       rotated.name: ("done", None), "huge.jpg": ("failed", "too_large"),
                       **{n: ("done", None) for n in odd},
                       **{n: ("failed", code) for n, (_, code, _) in hostile.items()}}
    assert all(c.model_version == version and c.text.strip() for c in captions)
    assert sorted(c.forward_size for c in captions) == [3] * 3 + [6] * 12  # the forward each came out of
    assert len(captions) == good


@pytest.mark.integration  # waits out the S3 clients' real retry backoff against a refused port: 35 s
@pytest.mark.slow
def test_an_unreachable_store_returns_the_image_to_the_queue(sqlite_url, checkpoint, photos, monkeypatch):
    import socket

    from captioner.core import storage

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: S3 connections are refused
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{closed.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    storage.s3_client.cache_clear()
    settings = Settings(database_url=sqlite_url, model_path=str(checkpoint), device="cpu", max_attempts=2)
    engine = make_engine(sqlite_url)
    sm = make_sessionmaker(engine)
    version = captioner.version(settings)
    try:
        images = [jobs.file_image(photos[2]), queries.NewImage("s3://bucket/a.jpg", "s3:bucket/a.jpg@etag")]
        _, submitted = jobs.submit_images(sm, images, version, "backfill", lambda _: None)
        reports = []
        for _ in range(2):
            with sm.begin() as s:
                reports.append(jobs.caption_claimed(sm, settings, queries.claim(s, version, 60, limit=10)))
    finally:
        storage.s3_client.cache_clear()
        closed.close()
    with sm() as s:
        first, second = (s.get(Job, x.job_id) for x in submitted)
    engine.dispose()
    assert (reports[0].captioned, reports[0].released) == (1, 1)  # a transient error is retried...
    assert (reports[1].failed, reports[1].released) == (1, 0)  # ...until its attempts run out
    assert first.status == "done" and (second.status, second.error_code) == ("failed", "unavailable")


def test_io_threads_run_torch_on_one_thread_and_the_forward_keeps_its_own(sqlite_url, checkpoint, photos,
                                                                           monkeypatch):
    # each thread that starts a parallel torch op gets an OpenMP team of its own: the I/O threads'
    # teams spinning beside the forward's cost it a quarter of its speed (`captioner bench pipeline`)
    import torch

    seen: dict[str, set[int]] = {"preprocess": set(), "forward": set()}
    preprocess, caption_batch = captioner.preprocess, captioner.caption_batch

    def spy_preprocess(image):
        seen["preprocess"].add(torch.get_num_threads())
        return preprocess(image)

    def spy_caption_batch(settings, tensors):
        seen["forward"].add(torch.get_num_threads())
        return caption_batch(settings, tensors)

    monkeypatch.setattr(captioner, "preprocess", spy_preprocess)
    monkeypatch.setattr(captioner, "caption_batch", spy_caption_batch)
    torch.set_num_threads(2)
    settings = Settings(database_url=sqlite_url, model_path=str(checkpoint), device="cpu", jpeg_decode="pillow",
                        forward_size=2)
    engine = make_engine(sqlite_url)
    sm = make_sessionmaker(engine)
    version = captioner.version(settings)
    jobs.submit_images(sm, [jobs.file_image(p) for p in photos[:4]], version, "backfill", lambda _: None)
    with sm.begin() as s:
        claimed = queries.claim(s, version, 60, limit=4)
    report = jobs.caption_claimed(sm, settings, claimed)
    engine.dispose()
    assert report.captioned == 4
    assert seen == {"preprocess": {1}, "forward": {2}}
    assert torch.get_num_threads() == 2


def test_the_models_quality_estimate_is_stored_and_shown_and_none_stays_null(sqlite_url, checkpoint, photos,
                                                                              monkeypatch):
    """Whatever the checkpoint estimates, the caption rows hold what the model handed over: the
    real model captions, and its answers get a quality (or none) before they are written."""
    from dataclasses import replace

    caption_batch = captioner.caption_batch
    given = iter([0.125, None])

    def with_quality(settings, tensors):
        return [replace(c, quality=next(given)) for c in caption_batch(settings, tensors)]

    monkeypatch.setattr(captioner, "caption_batch", with_quality)
    settings = Settings(database_url=sqlite_url, model_path=str(checkpoint), device="cpu", jpeg_decode="pillow",
                        forward_size=2)  # one forward, in the order claimed
    engine = make_engine(sqlite_url)
    sm = make_sessionmaker(engine)
    version = captioner.version(settings)
    jobs.submit_images(sm, [jobs.file_image(p) for p in photos[:2]], version, "backfill", lambda _: None)
    with sm.begin() as s:
        claimed = queries.claim(s, version, 60, limit=2)
    assert jobs.caption_claimed(sm, settings, claimed).captioned == 2
    ids = [c.image_id for c in claimed]
    with sm() as s:
        stored = dict(s.execute(select(Caption.image_id, Caption.quality)).all())
        shown = [queries.image_view(s, i, version)["quality"] for i in ids]
    engine.dispose()
    assert stored == {ids[0]: 0.125, ids[1]: None} and shown == [0.125, None]


def test_a_folder_walk_skips_hidden_files_and_folders(tmp_path):
    from captioner.core.jobs import expand_paths
    from captioner.core.prefixes import Skipped

    for name in ("a.jpg", "sub/b.JPG", "._a.jpg", ".cache/c.jpg", "sub/.d.captioner-tmp.jpg", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = {i.uri.removeprefix(tmp_path.resolve().as_uri() + "/") for i in expand_paths([str(tmp_path)], None, 10, 100, Skipped())}
    assert found == {"a.jpg", "sub/b.JPG"}
    # named on its own, a hidden file is taken: the user asked for it
    assert len(list(expand_paths([str(tmp_path / "._a.jpg")], None, 10, 100, Skipped()))) == 1


def test_progress_moves_a_forward_at_a_time(sqlite_url, checkpoint, photos, monkeypatch):
    """A claimed batch shows as processing only for the forward being run, and is written (done,
    the rate) as each forward ends: a batch of 6 in forwards of 2 is seen at 2, 4 then 6 done."""
    settings = Settings(database_url=sqlite_url, model_path=str(checkpoint), device="cpu", forward_size=2,
                        io_threads=1)
    sm = make_sessionmaker(make_engine(sqlite_url))
    version = captioner.version(settings)
    batch_id, submitted = jobs.submit_images(sm, [jobs.file_image(p) for p in photos[60:66]], version, "backfill",
                                             lambda _: None, batch_source="progress")
    with sm.begin() as s:
        claimed = queries.claim(s, version, 600, limit=6, batch_id=batch_id)
    with sm() as s:  # claimed and leased (nobody else may take them), but none is being captioned yet
        assert {j.status for j in s.scalars(select(Job))} == {"processing"}
        assert all(j.lease_until is not None for j in s.scalars(select(Job)))
        assert queries.batch_view(s, batch_id)["counts"] == {"queued": 6, "processing": 0, "done": 0, "failed": 0}
        assert queries.image_view(s, submitted[-1].image_id, version)["status"] == "queued"

    seen = []
    caption_batch = captioner.caption_batch

    def watched(settings: Settings, tensors: list) -> list:
        with sm() as s:  # what GET /v1/batches/<id> answers while this forward runs
            view = queries.batch_view(s, batch_id)
            seen.append((view["counts"], view["images_per_second"], view["eta_seconds"],
                         queries.image_view(s, submitted[-1].image_id, version)["status"]))
            assert {j.status for j in s.scalars(select(Job).where(Job.status != "done"))} == {"processing"}
        return caption_batch(settings, tensors)

    monkeypatch.setattr(captioner, "caption_batch", watched)
    report = jobs.caption_claimed(sm, settings, claimed)
    assert report.captioned == 6
    assert [counts for counts, *_ in seen] == [
        {"queued": 4, "processing": 2, "done": 0, "failed": 0},
        {"queued": 2, "processing": 2, "done": 2, "failed": 0},
        {"queued": 0, "processing": 2, "done": 4, "failed": 0}]
    assert seen[0][1] is None and seen[1][1] > 0 and seen[1][2] > 0  # a rate and an ETA from the first forward on
    assert [status for *_, status in seen] == ["queued", "queued", "processing"]  # the last image, forward 3
    with sm() as s:
        assert queries.batch_view(s, batch_id)["counts"]["done"] == 6
