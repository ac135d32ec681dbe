"""Captions written as XMP (core/metadata.py): sidecars and embedded, read back by `exiftool -j`
(a separate process from the one that wrote) and cross-checked with a plain XML parse or Pillow;
a person's description is imported and never overwritten; bad input never loses a byte."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from captioner.core import alttext, metadata
from captioner.core.errors import ConfigError
from captioner.core.tables import AltTextDecision, Caption, Image, MetadataWrite
from captioner.migrations import open_database
from test_hostile_images import ODD

NS = {"dc": "http://purl.org/dc/elements/1.1/", "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
      "Iptc4xmpCore": "http://iptc.org/std/Iptc4xmpCore/1.0/xmlns/", "photoshop": "http://ns.adobe.com/photoshop/1.0/",
      "captioner": "https://captioner.invalid/ns/xmp/1.0/"}
CAPTION = "A black dog runs across the grass."
TAGS = [["Labrador retriever", 0.81], ["lawn mower", 0.1]]


def exif(*paths: Path) -> list[dict]:
    """exiftool's own reading, in a fresh process: what Immich, digiKam and friends would see."""
    out = subprocess.run(["exiftool", "-j", "-G1", "-struct", *map(str, paths)], capture_output=True, text=True)
    return json.loads(out.stdout) if out.stdout.strip() else []


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def sm(tmp_path):
    return open_database(f"sqlite:///{tmp_path / 'captioner.db'}")


@pytest.fixture
def et():
    with metadata.exiftool_process() as tool:
        yield tool


def captioned(sm, path: Path, text: str = CAPTION, version: str = "v1", tags=TAGS, confidence: float = 0.7,
              quality: float | None = None) -> int:
    """The rows a captioning run leaves for `path` (as captioned now)."""
    digest = sha(path)
    with sm.begin() as s:
        image = s.scalar(select(Image).where(Image.fingerprint == f"sha256:{digest}"))
        if image is None:
            image = Image(uri=path.resolve().as_uri(), fingerprint=f"sha256:{digest}", sha256=digest,
                          size=path.stat().st_size)
            s.add(image)
            s.flush()
        s.add(Caption(image_id=image.id, model_version=version, text=text, alt_text=text.rstrip("."),
                      candidates=[[text, -1.0]], tags=tags, confidence=confidence, quality=quality, needs_review=False,
                      forward_size=1))
        return image.id


@pytest.fixture
def photo(tmp_path, photos):
    path = tmp_path / "pics" / photos[0].name
    path.parent.mkdir()
    shutil.copyfile(photos[0], path)
    return path


def test_a_sidecar_holds_every_field_as_exiftool_and_a_plain_xml_parser_read_it(sm, et, photo):
    captioned(sm, photo)
    before = photo.read_bytes()
    report = metadata.write_files(sm, [et], [str(photo.parent)], "sidecar")
    assert report.counts == {"sidecar": 1}
    sidecar = photo.with_name(photo.name + ".xmp")
    [tags] = exif(sidecar)
    assert tags["XMP-dc:Description"] == CAPTION
    assert tags["XMP-iptcCore:AltTextAccessibility"] == CAPTION.rstrip(".")
    assert tags["XMP-dc:Subject"] == ["Labrador retriever"]  # lawn mower is under the keyword threshold
    assert tags["XMP-photoshop:CaptionWriter"] == "captioner v1"
    assert photo.read_bytes() == before  # a sidecar run never touches the photo

    root = ET.parse(sidecar).getroot()  # the second reader: plain XML, no exiftool
    alt = root.find(".//dc:description/rdf:Alt/rdf:li", NS)
    assert alt.text == CAPTION and alt.get("{http://www.w3.org/XML/1998/namespace}lang") == "x-default"
    assert root.find(".//Iptc4xmpCore:AltTextAccessibility/rdf:Alt/rdf:li", NS).text == CAPTION.rstrip(".")
    assert [li.text for li in root.findall(".//dc:subject/rdf:Bag/rdf:li", NS)] == ["Labrador retriever"]
    assert root.find(".//captioner:ModelVersion", NS).text == "v1"
    assert float(root.find(".//captioner:Confidence", NS).text) == 0.7
    assert "XMP-captioner:Quality" not in tags  # the model had no estimator

    assert metadata.write_files(sm, [et], [str(photo)], "sidecar").counts == {"unchanged": 1}


def test_quality_is_written_when_estimated_and_removed_when_a_newer_model_has_none(sm, et, photo):
    captioned(sm, photo, quality=0.8125)
    assert metadata.write_files(sm, [et], [str(photo)], "sidecar").counts == {"sidecar": 1}
    sidecar = photo.with_name(photo.name + ".xmp")
    [tags] = exif(sidecar)
    assert tags["XMP-captioner:Quality"] == 0.8125 and tags["XMP-captioner:Confidence"] == 0.7
    assert float(ET.parse(sidecar).getroot().find(".//captioner:Quality", NS).text) == 0.8125
    assert metadata.write_files(sm, [et], [str(photo)], "sidecar").counts == {"unchanged": 1}

    captioned(sm, photo, "A dog on a lawn.", version="v2")  # a newer model without an estimator
    assert metadata.write_files(sm, [et], [str(photo)], "sidecar").counts == {"sidecar": 1}
    [tags] = exif(sidecar)
    assert tags["XMP-dc:Description"] == "A dog on a lawn." and "XMP-captioner:Quality" not in tags
    assert metadata.write_files(sm, [et], [str(photo)], "sidecar").counts == {"unchanged": 1}


def test_stem_naming_merges_into_an_existing_sidecar_keeping_other_fields(sm, et, photo):
    captioned(sm, photo)
    sidecar = photo.with_suffix(".xmp")  # Lightroom's name
    subprocess.run(["exiftool", "-q", "-XMP-xmp:Rating=4", "-XMP-dc:Subject=holiday", str(sidecar)], check=True)
    report = metadata.write_files(sm, [et], [str(photo)], "sidecar", naming="stem")
    assert report.counts == {"sidecar": 1}
    [tags] = exif(sidecar)
    assert tags["XMP-xmp:Rating"] == 4
    assert tags["XMP-dc:Subject"] == ["holiday", "Labrador retriever"]  # the person's keyword stays
    assert tags["XMP-dc:Description"] == CAPTION
    assert not photo.with_name(photo.name + ".xmp").exists()


def pixels(path: Path) -> list[bytes]:
    with PILImage.open(path) as im:
        frames = []
        for n in range(getattr(im, "n_frames", 1)):
            im.seek(n)
            frames.append(im.tobytes())
        return frames


def image_data(path: Path) -> bytes:
    """A JPEG's entropy-coded data (first SOS to EOI); a PNG's IDAT chunks; else the whole decode."""
    data = path.read_bytes()
    if data[:2] == b"\xff\xd8":
        return data[data.index(b"\xff\xda"):data.rindex(b"\xff\xd9")]
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        out, i = b"", 8
        while i < len(data):
            size = int.from_bytes(data[i:i + 4], "big")
            if data[i + 4:i + 8] == b"IDAT":
                out += data[i + 8:i + 8 + size]
            i += 12 + size
        return out
    return b"".join(pixels(path))


@pytest.mark.parametrize("mode", metadata.MODES)
@pytest.mark.parametrize("name", sorted(ODD))
def test_every_odd_format_gets_its_fields_and_keeps_every_pixel_byte(sm, et, tmp_path, name, mode):
    path = tmp_path / name
    path.write_bytes(ODD[name]()[0])
    os.chmod(path, 0o640)
    os.utime(path, (1_600_000_000, 1_600_000_000))
    before_bytes, before_pixels, before_data = path.read_bytes(), pixels(path), image_data(path)
    captioned(sm, path)
    report = metadata.write_files(sm, [et], [str(path)], mode)
    sidecar = path.with_name(path.name + ".xmp")
    if mode == "sidecar":
        assert report.counts == {"sidecar": 1}
        assert path.read_bytes() == before_bytes
        [tags] = exif(sidecar)
    elif name.endswith(".bmp"):  # BMP has no place for XMP: a sidecar instead, reported
        assert report.counts == {"fell_back_to_sidecar": 1}
        assert "cannot hold XMP" in report.notes[0][2]
        [tags] = exif(sidecar)
    else:
        assert report.counts == {"embedded": 1}, report.notes
        assert not sidecar.exists()
        [tags] = exif(path)
        xmp = PILImage.open(path).info.get("xmp")  # the second reader, where Pillow exposes the packet
        if xmp is not None:
            assert CAPTION.encode() in (xmp if isinstance(xmp, bytes) else xmp.encode())
    assert tags["XMP-dc:Description"] == CAPTION
    assert tags["XMP-iptcCore:AltTextAccessibility"] == CAPTION.rstrip(".")
    assert tags["XMP-dc:Subject"] == ["Labrador retriever"]
    assert pixels(path) == before_pixels and image_data(path) == before_data
    st = path.stat()
    assert (oct(st.st_mode & 0o777), st.st_mtime) == ("0o640", 1_600_000_000)
    assert [p.name for p in tmp_path.iterdir() if "captioner-tmp" in p.name] == []


def test_a_person_s_description_is_imported_as_approved_alt_text_and_never_overwritten(sm, et, photo):
    theirs = "Rex, our dog, on his first day at the park"
    subprocess.run(["exiftool", "-q", "-overwrite_original", f"-IPTC:Caption-Abstract={theirs}", str(photo)],
                   check=True)
    image_id = captioned(sm, photo)
    assert metadata.import_descriptions(sm, et, [str(photo)]) == 1
    assert metadata.import_descriptions(sm, et, [str(photo)]) == 0  # once per text
    with sm() as s:
        view = alttext.view(s, image_id)
    assert (view["text"], view["state"], view["by"]) == (theirs, "approved", "metadata")
    assert view["suggestion"]["text"] == CAPTION.rstrip(".")  # the model's caption: a suggestion only

    report = metadata.write_files(sm, [et], [str(photo)], "embed")
    assert report.counts == {"embedded": 1}
    [tags] = exif(photo)
    assert tags["IPTC:Caption-Abstract"] == theirs
    assert "XMP-dc:Description" not in tags  # the person's description stands; no second one beside it
    assert tags["XMP-iptcCore:AltTextAccessibility"] == theirs  # the approved alt text

    report = metadata.write_files(sm, [et], [str(photo)], "embed", overwrite=True)
    assert report.counts == {"embedded": 1, "overwrote_person": 1}
    assert exif(photo)[0]["XMP-dc:Description"] == CAPTION


def test_captioner_s_own_fields_follow_a_newer_model_and_a_review_decision(sm, et, photo):
    image_id = captioned(sm, photo)
    assert metadata.write_files(sm, [et], [str(photo)], "embed").counts == {"embedded": 1}
    # the file's bytes changed: it is still known, by what captioner wrote (metadata_writes)
    with sm.begin() as s:
        assert s.scalar(select(MetadataWrite.image_id)) == image_id
        s.add(Caption(image_id=image_id, model_version="v2", text="A dog plays on a lawn.", alt_text="A dog playing",
                      candidates=[], tags=TAGS, confidence=0.9, needs_review=False, forward_size=1))
    assert metadata.write_files(sm, [et], [str(photo)], "embed").counts == {"embedded": 1}
    [tags] = exif(photo)
    assert (tags["XMP-dc:Description"], tags["XMP-photoshop:CaptionWriter"]) == ("A dog plays on a lawn.",
                                                                                   "captioner v2")
    with sm.begin() as s:
        alttext.decide(s, image_id, "edited", "A dog on a lawn", "reviewer")
    assert metadata.write_files(sm, [et], [str(photo)], "embed").counts == {"embedded": 1}
    assert exif(photo)[0]["XMP-iptcCore:AltTextAccessibility"] == "A dog on a lawn"
    assert metadata.write_files(sm, [et], [str(photo)], "embed").counts == {"unchanged": 1}


def test_a_file_changed_since_captioned_is_skipped(sm, et, photo, tmp_path):
    captioned(sm, photo)
    with PILImage.open(photo) as im:
        im.rotate(90).save(photo)  # another photo now, at the same path
    report = metadata.write_files(sm, [et], [str(photo)], "sidecar")
    assert report.counts == {"changed": 1}
    assert not photo.with_name(photo.name + ".xmp").exists()
    stranger = tmp_path / "stranger.png"
    PILImage.new("RGB", (8, 8)).save(stranger)
    assert metadata.write_files(sm, [et], [str(stranger)], "sidecar").counts == {"not_captioned": 1}


def test_read_only_files_and_folders_are_left_alone(sm, et, photo):
    captioned(sm, photo)
    before = photo.read_bytes()
    photo.chmod(0o444)
    assert metadata.write_files(sm, [et], [str(photo)], "embed").counts == {"read_only": 1}
    photo.parent.chmod(0o555)
    try:
        assert metadata.write_files(sm, [et], [str(photo)], "sidecar").counts == {"read_only": 1}
    finally:
        photo.parent.chmod(0o755)
    assert photo.read_bytes() == before and not photo.with_name(photo.name + ".xmp").exists()


@pytest.mark.parametrize("content", [b"not xml at all\n", b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF'])
def test_a_corrupt_sidecar_is_kept_and_reported(sm, et, photo, content):
    captioned(sm, photo)
    sidecar = photo.with_name(photo.name + ".xmp")
    sidecar.write_bytes(content)
    report = metadata.write_files(sm, [et], [str(photo)], "sidecar")
    assert report.counts == {"corrupt_sidecar": 1}
    assert "kept, not replaced" in report.notes[0][2]
    assert sidecar.read_bytes() == content


def test_a_missing_exiftool_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="needs exiftool.*libimage-exiftool-perl"):
        metadata.exiftool_process()


def test_kill_9_during_a_200_file_embed_run_leaves_each_file_whole(sm, tmp_path, photos):
    folder = tmp_path / "library"
    folder.mkdir()
    originals = {}
    for p in photos[:200]:
        shutil.copyfile(p, folder / p.name)
        originals[p.name] = (folder / p.name).read_bytes()
        captioned(sm, folder / p.name)
    env = {**os.environ, "CAPTIONER_DATABASE_URL": f"sqlite:///{tmp_path / 'captioner.db'}"}
    env.pop("CAPTIONER_BROKER_URL", None)
    argv = [sys.executable, "-m", "captioner.cli", "write-metadata", "--mode", "embed", str(folder)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while sum((folder / n).read_bytes() != b for n, b in originals.items()) < 40:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    untouched = written = 0
    for name, data in originals.items():
        path = folder / name
        if path.read_bytes() == data:
            untouched += 1
            continue
        [tags] = exif(path)
        assert tags["XMP-dc:Description"] == CAPTION, name  # completely written, never half
        assert image_data(path) == image_data_of(data)
        written += 1
    assert written >= 40 and untouched > 0
    # the next run cleans up after the killed one and finishes the rest
    subprocess.run(argv, env=env, check=True, capture_output=True)
    assert all(exif(folder / n)[0]["XMP-dc:Description"] == CAPTION for n in originals)
    assert [p.name for p in folder.iterdir() if "captioner-tmp" in p.name] == []


def image_data_of(data: bytes) -> bytes:
    return data[data.index(b"\xff\xda"):data.rindex(b"\xff\xd9")]


def test_caption_write_metadata_end_to_end_with_the_model(tmp_path, photos, checkpoint, monkeypatch):
    from click.testing import CliRunner

    from captioner.cli import cli
    from captioner.core.settings import get_settings

    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos[:3]:
        shutil.copyfile(p, folder / p.name)
    first = folder / photos[0].name
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-XMP-dc:Description=Our garden, June", str(first)],
                   check=True)
    for key, value in {"CAPTIONER_DATABASE_URL": f"sqlite:///{tmp_path / 'c.db'}", "CAPTIONER_MODEL_PATH":
                       str(checkpoint), "CAPTIONER_STORAGE": str(tmp_path / "store")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("CAPTIONER_BROKER_URL", raising=False)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["caption", str(folder), "--write-metadata", "sidecar"],
                                    catch_exceptions=False)
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "1 descriptions people wrote imported as approved alt text" in result.output
    assert "metadata: 3 sidecar" in result.output
    sm = open_database(f"sqlite:///{tmp_path / 'c.db'}")
    with sm() as s:
        texts = dict(s.execute(select(Image.uri, Caption.text).join(Caption, Caption.image_id == Image.id)).all())
        decided = s.scalars(select(AltTextDecision.text)).all()
    assert decided == ["Our garden, June"]
    for p in sorted(folder.glob("*.jpg")):
        [tags] = exif(p.with_name(p.name + ".xmp"))
        if p == first:
            assert "XMP-dc:Description" not in tags  # the file's own description stands
            assert tags["XMP-iptcCore:AltTextAccessibility"] == "Our garden, June"
        else:
            assert tags["XMP-dc:Description"] == texts[p.resolve().as_uri()]


def test_s3_sidecars_are_written_beside_the_objects(sm, et, s3, tmp_path, photos):
    from captioner.core import storage
    from captioner.core.tables import Batch, BatchImage, Job

    bucket = s3["S3_TEST_BUCKET"]
    client = storage.s3_client()
    client.put_object(Bucket=bucket, Key="lib/dog.jpg", Body=photos[0].read_bytes())
    client.put_object(Bucket=bucket, Key="lib/cat.jpg", Body=photos[1].read_bytes())
    client.put_object(Bucket=bucket, Key="lib/cat.jpg.xmp", Body=b"garbage")
    job_ids = []
    with sm.begin() as s:
        batch = Batch(model_version="v1", source=f"s3://{bucket}/lib/", total=2, write_metadata="sidecar")
        s.add(batch)
        s.flush()
        for key in ("lib/dog.jpg", "lib/cat.jpg"):
            obj = storage.head(bucket, key)
            image = Image(uri=obj.uri, fingerprint=f"s3:{bucket}/{key}@{obj.etag}", size=obj.size)
            s.add(image)
            s.flush()
            s.add(BatchImage(batch_id=batch.id, image_id=image.id))
            job = Job(image_id=image.id, model_version="v1", status="done")
            s.add(job)
            s.add(Caption(image_id=image.id, model_version="v1", text=CAPTION, alt_text="a dog", candidates=[],
                          tags=TAGS, confidence=0.5, needs_review=False, forward_size=1))
            s.flush()
            job_ids.append(job.id)
    report = metadata.write_s3_sidecars(sm, lambda: et, job_ids)
    assert report.counts == {"sidecar": 1, "corrupt_sidecar": 1}
    assert client.get_object(Bucket=bucket, Key="lib/cat.jpg.xmp")["Body"].read() == b"garbage"
    local = tmp_path / "dog.jpg.xmp"
    local.write_bytes(client.get_object(Bucket=bucket, Key="lib/dog.jpg.xmp")["Body"].read())
    [tags] = exif(local)
    assert (tags["XMP-dc:Description"], tags["XMP-iptcCore:AltTextAccessibility"]) == (CAPTION, "a dog")

    # later, for a whole prefix (`captioner write-metadata s3://...`): objects are found by their ETag
    client.put_object(Bucket=bucket, Key="lib/new.jpg", Body=photos[2].read_bytes())
    client.put_object(Bucket=bucket, Key="lib/cat.jpg", Body=photos[3].read_bytes())  # another photo now
    report = metadata.write_s3_prefix(sm, et, bucket, "lib/", 100)
    assert report.counts == {"unchanged": 1, "changed": 1, "not_captioned": 1}, report.notes


def test_bench_metadata_times_captioning_and_sidecars_in_one_run(photos, checkpoint, tmp_path):
    from captioner.bench.metadata import run
    from captioner.core.settings import Settings

    originals = tmp_path / "originals"
    originals.mkdir()
    for p in photos[:3]:
        shutil.copyfile(p, originals / p.name)
    row = run(Settings(model_path=str(checkpoint), batch_size=4), sorted(originals.iterdir()))
    assert row["photos"] == 3 and row["caption_s"] > 0 and row["metadata_s"] > 0
    assert row["overhead_pct"] > 0 and row["ms_per_file"] > 0
    assert sorted(p.name for p in originals.iterdir()) == [p.name for p in photos[:3]]  # sidecars beside the links


def test_parallel_writers_write_every_file_once_and_stem_sharers_merge(sm, et, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for n in range(metadata.CHUNK * 2 + 5):
        PILImage.new("RGB", (4, 4), (n, 0, 0)).save(folder / f"img{n:03d}.png")
        captioned(sm, folder / f"img{n:03d}.png", f"Photo number {n}.")
    # a.jpg and a.png share a.xmp under stem naming: one chunk, written one after the other
    PILImage.new("RGB", (4, 4), "blue").save(folder / "a.jpg")
    PILImage.new("RGB", (4, 4), "red").save(folder / "a.png")
    captioned(sm, folder / "a.jpg", "A blue square.")
    captioned(sm, folder / "a.png", "A red square.")
    with metadata.exiftool_processes(2) as tools:
        report = metadata.write_files(sm, tools, [str(folder), str(folder / "a.jpg")], "sidecar", naming="stem")
    assert report.counts == {"sidecar": metadata.CHUNK * 2 + 7}, report.notes
    tags = {Path(t["SourceFile"]).name: t for t in exif(*sorted(folder.glob("*.xmp")))}
    assert all(tags[f"img{n:03d}.xmp"]["XMP-dc:Description"] == f"Photo number {n}."
               for n in range(metadata.CHUNK * 2 + 5))
    assert tags["a.xmp"]["XMP-dc:Description"] == "A red square."  # the later file's caption, merged, not corrupt
