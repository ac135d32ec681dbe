"""Captions where photo software reads them: XMP sidecars and XMP embedded in the image, written by
exiftool (one long-lived -stay_open process per run) and read back before every write, so that a
description a person wrote is imported as approved alt text and never overwritten.

docs/metadata.md: which field goes where, and how Immich, digiKam and Lightroom read them."""
import hashlib
import json
import logging
import os
import shutil
import stat
import queue
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from . import alttext, queries, storage
from .errors import ConfigError, InvalidRequest
from .tables import AltTextDecision, Batch, BatchImage, Caption, Image, Job, MetadataWrite, utcnow

log = logging.getLogger(__name__)
MODES = ("sidecar", "embed")
SIDECAR_NAMES = ("ext", "stem")  # NAME.EXT.xmp (digiKam, Immich, darktable) or NAME.xmp (Lightroom)
KEYWORD_MIN_SCORE = 0.3  # a tag below this probability is too often wrong to become a keyword
DECIDED_BY = "metadata"  # who made an alt-text decision imported from a file's own description
CONFIG = Path(__file__).with_name("exiftool.config")  # our private XMP namespace
CHUNK = 64  # files per exiftool read and per database look-up; chunks go to the writers in turn
WRITERS = min(4, os.cpu_count() or 1)  # exiftool processes writing at once: Perl is single-threaded
# what cameras put in EXIF ImageDescription by themselves: no person wrote it
CAMERA_DEFAULTS = frozenset({"OLYMPUS DIGITAL CAMERA", "SONY DSC", "DIGITAL CAMERA", "KONICA MINOLTA DIGITAL CAMERA",
                             "MINOLTA DIGITAL CAMERA", "SAMSUNG DIGITAL CAMERA", "DCIM", "DEFAULT"})
READ_TAGS = ("-XMP-dc:Description", "-XMP-iptcCore:AltTextAccessibility", "-XMP-dc:Subject", "-XMP-captioner:all",
             "-IPTC:Caption-Abstract", "-IFD0:ImageDescription", "-File:FileType",
             "-ExifTool:Warning", "-ExifTool:Error")  # a sidecar exiftool warns about is not merged into


def exiftool_process() -> Any:
    """An exiftool.ExifTool for `with`: one Perl process for the whole run, so a file costs a
    few milliseconds, not a process start. A clear error when exiftool is missing."""
    if shutil.which("exiftool") is None:
        raise ConfigError("writing metadata needs exiftool, which is not installed: apt-get install "
                          "libimage-exiftool-perl (Debian, Ubuntu) or brew install exiftool (macOS)",
                          code="exiftool_missing")
    import exiftool  # PyExifTool: only runs that write metadata need it

    return exiftool.ExifTool(config_file=str(CONFIG), common_args=["-charset", "filename=utf8"])


@contextmanager
def exiftool_processes(count: int = WRITERS) -> Iterator[list[Any]]:
    """`count` running exiftool processes, for write_files; the first one also serves reads."""
    with ExitStack() as stack:
        yield [stack.enter_context(exiftool_process()) for _ in range(count)]


@dataclass(frozen=True)
class Found:
    """What one file (its sidecar over its embedded metadata) says, and which of it captioner wrote."""
    description: str | None = None
    alt_text: str | None = None
    keywords: tuple[str, ...] = ()
    ours: dict[str, Any] = field(default_factory=dict)  # the captioner:* tags
    problem: str | None = None  # exiftool's error or warning about the file
    file_type: str | None = None

    @property
    def person_description(self) -> str | None:
        if self.description and self.description != self.ours.get("Description"):
            return self.description
        return None

    @property
    def person_alt_text(self) -> str | None:
        if self.alt_text and self.alt_text != self.ours.get("AltText"):
            return self.alt_text
        return None


def _text(value: Any) -> str | None:
    text = None if value is None else str(value).strip()
    return text or None


def _list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return tuple(str(v) for v in (value if isinstance(value, list) else [value]))


def _found(tags: dict[str, Any]) -> Found:
    exif = _text(tags.get("IFD0:ImageDescription"))
    description = (_text(tags.get("XMP-dc:Description")) or _text(tags.get("IPTC:Caption-Abstract"))
                   or (exif if exif and exif.upper() not in CAMERA_DEFAULTS else None))
    ours = {k.split(":", 1)[1]: v for k, v in tags.items() if k.startswith("XMP-captioner:")}
    if "Description" in ours:
        ours["Description"] = str(ours["Description"])
    if "AltText" in ours:
        ours["AltText"] = str(ours["AltText"])
    ours["Keywords"] = _list(ours.get("Keywords"))
    problem = tags.get("ExifTool:Error") or tags.get("ExifTool:Warning")
    return Found(description, _text(tags.get("XMP-iptcCore:AltTextAccessibility")),
                 _list(tags.get("XMP-dc:Subject")), ours, problem, tags.get("File:FileType"))


def sidecar_problem(found: Found | None) -> str | None:
    """Why an existing sidecar must be kept as it is, not merged into: None when it is sound XMP."""
    if found is None:
        return "exiftool cannot read it"
    if found.file_type != "XMP":
        return f"not XMP (exiftool reads it as {found.file_type or 'nothing it knows'})"
    return found.problem


def read(et: Any, paths: list[Path]) -> dict[Path, Found]:
    """Every file's metadata in one exiftool call; a file exiftool cannot read is left out."""
    if not paths:
        return {}
    # -n: numbers and text as written, not formatted; -G1: the XMP namespace in each key
    out = et.execute("-j", "-n", "-G1", *READ_TAGS, *map(str, paths))
    return {Path(r["SourceFile"]): _found(r) for r in (json.loads(out) if out.strip() else [])}


def merged(embedded: Found | None, sidecar: Found | None) -> Found:
    """The sidecar wins where it says something (digiKam and Lightroom keep a photo's edits there)."""
    e, s = embedded or Found(), sidecar or Found()
    return Found(s.description or e.description, s.alt_text or e.alt_text, s.keywords or e.keywords,
                 s.ours or e.ours, s.problem)


def sidecar_path(path: Path, naming: str) -> Path:
    return path.with_name(path.name + ".xmp") if naming == "ext" else path.with_suffix(".xmp")


@dataclass(frozen=True)
class Wanted:
    """What captioner would say about one image."""
    caption: str
    alt_text: str  # "" for a decorative image: no alt-text field
    keywords: tuple[str, ...]
    model_version: str
    confidence: float
    quality: float | None  # None: the model had no estimator, and the file gets no Quality tag


def wanted(caption: Caption, decision: AltTextDecision | None, min_score: float = KEYWORD_MIN_SCORE) -> Wanted:
    """The caption, the alt text a person decided (else the model's), and the tags above min_score."""
    alt = decision.text if decision is not None else caption.alt_text
    keywords = tuple(dict.fromkeys(str(label) for label, score in caption.tags if score >= min_score))
    quality = None if caption.quality is None else round(caption.quality, 4)
    return Wanted(caption.text, alt, keywords, caption.model_version, round(caption.confidence, 4), quality)


def _one_line(text: str) -> str:
    # exiftool's -stay_open reads one argument per line: a newline would split a value
    return " ".join(text.split())


def plan(found: Found, want: Wanted, overwrite: bool) -> tuple[list[str], list[str]]:
    """-> (exiftool assignments, or [] when the file already says it all; a person's fields
    overwritten, only with `overwrite`). A person's fields are kept; captioner's own are updated."""
    args: list[str] = []
    overwritten: list[str] = []
    same = True
    if found.person_description is None or overwrite:
        if found.person_description is not None:
            overwritten.append("description")
        same &= found.description == want.caption and str(found.ours.get("ModelVersion")) == want.model_version
        caption = _one_line(want.caption)
        args += [f"-XMP-dc:Description={caption}", f"-XMP-captioner:Description={caption}",
                 f"-XMP-photoshop:CaptionWriter=captioner {want.model_version}"]
    if found.person_alt_text is None or overwrite:
        if found.person_alt_text is not None:
            overwritten.append("alt text")
        same &= (found.alt_text or "") == want.alt_text
        alt = _one_line(want.alt_text)
        args += [f"-XMP-iptcCore:AltTextAccessibility={alt}", f"-XMP-captioner:AltText={alt}"]
    # keywords merge: a person's stay, captioner's previous ones give way to the current ones
    people = [k for k in found.keywords if k not in found.ours.get("Keywords", ())]
    keywords = list(dict.fromkeys([*people, *want.keywords]))
    same &= list(found.keywords) == keywords and found.ours.get("Keywords", ()) == want.keywords
    same &= found.ours.get("Confidence") == want.confidence and found.ours.get("Quality") == want.quality
    args += ["-XMP-dc:Subject=", *(f"-XMP-dc:Subject={k}" for k in keywords),
             "-XMP-captioner:Keywords=", *(f"-XMP-captioner:Keywords={k}" for k in want.keywords),
             f"-XMP-captioner:ModelVersion={want.model_version}", f"-XMP-captioner:Confidence={want.confidence}",
             # an empty value deletes the tag: a model without an estimator leaves no stale quality behind
             f"-XMP-captioner:Quality={'' if want.quality is None else want.quality}"]
    return ([] if same else args), overwritten


class Unwritable(Exception):
    """exiftool cannot write this format (BMP, for one): the caption goes to a sidecar instead."""


def _run(et: Any, args: list[str]) -> None:
    out = et.execute(*args)
    err = et.last_stderr or ""
    if "Can't write" in err or "not yet supported" in err:
        raise Unwritable(err.strip())
    if "1 image files updated" not in out and "1 image files created" not in out:
        raise OSError(f"exiftool: {(err or out).strip()}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp(target: Path, suffix: str) -> Path:
    """A fixed name beside the target: a run killed mid-write leaves at most this, and the next run removes it."""
    tmp = target.with_name(f".{target.name}.captioner-tmp{suffix}")
    tmp.unlink(missing_ok=True)
    Path(f"{tmp}_exiftool_tmp").unlink(missing_ok=True)  # exiftool's own temp file, from a killed run
    return tmp


def _finish(tmp: Path, target: Path, like: os.stat_result | None) -> None:
    """Give tmp the original's mode, owner and times, then rename it over the target: a crash
    leaves the target as it was or as written, never half of each."""
    if like is not None:
        os.chmod(tmp, stat.S_IMODE(like.st_mode))
        if os.geteuid() == 0:
            os.chown(tmp, like.st_uid, like.st_gid)
        os.utime(tmp, ns=(like.st_atime_ns, like.st_mtime_ns))
    _fsync(tmp)
    os.replace(tmp, target)
    _fsync(target.parent)


def write_sidecar(et: Any, sidecar: Path, args: list[str]) -> None:
    tmp = _temp(sidecar, ".xmp")  # exiftool creates an XMP file from nothing only under a .xmp name
    like = sidecar.stat() if sidecar.exists() else None
    try:
        if like is not None:
            shutil.copyfile(sidecar, tmp)
            _run(et, [*args, "-overwrite_original", str(tmp)])
        else:
            _run(et, [*args, str(tmp)])
        _finish(tmp, sidecar, like)
    finally:
        tmp.unlink(missing_ok=True)


def write_embedded(et: Any, path: Path, args: list[str], before_rename: Any) -> None:
    """Into the file itself, on a copy renamed over it; `before_rename(sha256)` records the new
    bytes first, so the database never lacks a file that is on disk."""
    tmp = _temp(path, path.suffix)
    like = path.stat()
    try:
        shutil.copyfile(path, tmp)
        _run(et, [*args, "-overwrite_original", str(tmp)])
        before_rename(sha256_of(tmp))
        _finish(tmp, path, like)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_only(path: Path) -> bool:
    """Marked read-only (no owner write bit), or not writable by us: left alone even by root."""
    st = path.stat()
    return not st.st_mode & stat.S_IWUSR or not os.access(path, os.W_OK)


@dataclass
class Report:
    counts: Counter = field(default_factory=Counter)  # outcome -> files
    notes: list[tuple[str, str, str]] = field(default_factory=list)  # (path, outcome, detail) worth reading

    def add(self, path: Path | str, outcome: str, detail: str = "") -> None:
        self.counts[outcome] += 1
        if detail:
            self.notes.append((str(path), outcome, detail))


def local_files(paths: Iterable[str], limit: int | None = None) -> Iterator[Path]:
    """Image files under `paths`, each once (a file named twice would be written by two writers)."""
    count = 0
    seen: set[Path] = set()
    for raw in paths:
        if raw.startswith("s3://"):
            raise InvalidRequest(f"{raw}: S3 objects get sidecars only: send \"write_metadata\": \"sidecar\" "
                                 "with POST /v1/batches, or run captioner write-metadata s3://... for ones captioned")
        path = Path(raw)
        if path.is_dir():
            found: Iterable[Path] = (p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")
                                     and p.suffix.lower() in storage.IMAGE_SUFFIXES)
        elif path.is_file():
            found = [path]
        else:
            raise InvalidRequest(f"{raw}: no such file or folder")
        for p in found:
            if p.resolve() in seen:
                continue
            if limit is not None and count >= limit:
                return
            seen.add(p.resolve())
            count += 1
            yield p


def _chunks(items: Iterable[Path]) -> Iterator[list[Path]]:
    """CHUNK files at a time; files that share a stem (a.jpg, a.png) stay in one chunk, as they may
    share a NAME.xmp sidecar: chunks are written in parallel."""
    chunk: list[Path] = []
    for item in items:
        if len(chunk) >= CHUNK and item.with_suffix("") != chunk[-1].with_suffix(""):
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


def _identify(s: Session, tenant: str, hashes: dict[Path, str]) -> tuple[dict[Path, int], set[Path]]:
    """-> (file -> image id for files as captioned or as captioner last wrote them, files whose
    path captioner knows but whose bytes are new: changed since)."""
    by_sha = dict(s.execute(select(Image.sha256, Image.id).where(
        Image.tenant == tenant, Image.fingerprint.in_([f"sha256:{h}" for h in hashes.values()]))).all())
    by_sha.update(s.execute(select(MetadataWrite.sha256, MetadataWrite.image_id).join(Image).where(
        Image.tenant == tenant, MetadataWrite.sha256.in_(list(hashes.values())))).all())
    found = {p: by_sha[h] for p, h in hashes.items() if h in by_sha}
    rest = {p.resolve().as_uri(): p for p in hashes if p not in found}
    known = set(s.scalars(select(Image.uri).where(Image.tenant == tenant, Image.uri.in_(list(rest)))))
    known |= {Path(x).resolve().as_uri() for x in s.scalars(select(MetadataWrite.path).where(
        MetadataWrite.path.in_([str(p.resolve()) for p in rest.values()])))}
    return found, {rest[u] for u in known}


def import_descriptions(sm: sessionmaker, et: Any, paths: Iterable[str], tenant: str = "default",
                        naming: str = "ext", limit: int | None = None) -> int:
    """Before captioning: a description or alt text a person wrote into a file (or its sidecar)
    becomes the image's approved alt text, decided by "metadata" -> images it was imported for.
    Once per text: a reviewer's later decision is not undone by the next run."""
    imported = 0
    for chunk in _chunks(local_files(paths, limit)):
        hashes = {p: sha256_of(p) for p in chunk}
        sidecars = [sidecar_path(p, naming) for p in chunk]
        tags = read(et, [*chunk, *(x for x in sidecars if x.exists())])
        with sm.begin() as s:
            ids, _ = _identify(s, tenant, hashes)
            for p, sc in zip(chunk, sidecars):
                side = tags.get(sc) if sc.exists() and sidecar_problem(tags.get(sc)) is None else None
                f = merged(tags.get(p), side)
                text = f.person_alt_text or f.person_description
                if text is None or p not in ids:
                    continue
                text = _one_line(text)[:alttext.MAX_CHARS]  # alt text is one line, as the review queue keeps it
                done = s.scalar(select(AltTextDecision.id).where(
                    AltTextDecision.image_id == ids[p], AltTextDecision.decided_by == DECIDED_BY,
                    AltTextDecision.text == text).limit(1))
                if done is None:
                    s.add(AltTextDecision(image_id=ids[p], state="approved", text=text, model_version=None,
                                          decided_by=DECIDED_BY, decided_at=utcnow()))
                    imported += 1
    return imported


def write_files(sm: sessionmaker, tools: Sequence[Any], paths: Iterable[str], mode: str, naming: str = "ext",
                tenant: str = "default", model_version: str | None = None, overwrite: bool = False,
                min_score: float = KEYWORD_MIN_SCORE, limit: int | None = None) -> Report:
    """Write each captioned file's caption, alt text and keywords (mode "sidecar" or "embed"),
    chunks of files in parallel, one exiftool process of `tools` each. A file is found by its
    bytes: one that changed since it was captioned is skipped, never given another photo's caption."""
    if mode not in MODES:
        raise InvalidRequest(f"mode must be one of {', '.join(MODES)}")
    if naming not in SIDECAR_NAMES:
        raise InvalidRequest(f"sidecar naming must be one of {', '.join(SIDECAR_NAMES)}")
    free: queue.Queue = queue.Queue()
    for tool in tools:
        free.put(tool)

    def write_chunk(chunk: list[Path]) -> Report:
        et = free.get()
        try:
            return _write_chunk(sm, et, chunk, mode, naming, tenant, model_version, overwrite, min_score)
        finally:
            free.put(et)

    report = Report()
    with ThreadPoolExecutor(max_workers=len(tools)) as pool:
        for part in pool.map(write_chunk, _chunks(local_files(paths, limit))):
            report.counts.update(part.counts)
            report.notes += part.notes
    return report


def _write_chunk(sm: sessionmaker, et: Any, chunk: list[Path], mode: str, naming: str, tenant: str,
                 model_version: str | None, overwrite: bool, min_score: float) -> Report:
    report = Report()
    hashes = {p: sha256_of(p) for p in chunk}
    with sm() as s:
        ids, changed = _identify(s, tenant, hashes)
        rows = s.execute(queries.results_query(model_version).where(Image.id.in_(set(ids.values())))).all()
    captions = {image.id: (caption, decision) for image, caption, decision in rows}
    sidecars = {p: sidecar_path(p, naming) for p in chunk}
    tags = read(et, [*chunk, *(x for x in sidecars.values() if x.exists())])
    for p in chunk:
        if p in changed:
            report.add(p, "changed", "the file changed since it was captioned: skipped")
        elif p not in ids or ids[p] not in captions:
            report.add(p, "not_captioned", "no caption for this file" + (f" by model {model_version}"
                                                                        if model_version else ""))
        else:
            caption, decision = captions[ids[p]]
            _write_one(sm, et, p, sidecars[p], tags, mode, wanted(caption, decision, min_score), ids[p],
                       overwrite, report)
    return report


def _write_one(sm: sessionmaker, et: Any, path: Path, sidecar: Path, tags: dict[Path, Found], mode: str,
               want: Wanted, image_id: int, overwrite: bool, report: Report) -> None:
    # a sidecar another file of this chunk wrote just now (a shared NAME.xmp) is read afresh
    side = (tags.get(sidecar) or read(et, [sidecar]).get(sidecar)) if sidecar.exists() else None
    if sidecar.exists() and (why := sidecar_problem(side)):
        report.add(sidecar, "corrupt_sidecar", f"existing sidecar kept, not replaced: {why}")
        return
    found = merged(tags.get(path), side)
    args, overwritten = plan(found, want, overwrite)
    if not args:
        report.add(path, "unchanged")
        return
    for what in overwritten:
        log.warning("--overwrite: replacing the %s a person wrote in %s", what, path)
        report.add(path, "overwrote_person", f"the {what} a person wrote was replaced (--overwrite)")
    fell_back = ""
    try:
        if mode == "embed":
            real = path.resolve()  # through a link into the photo itself, not over the link
            if read_only(real) or read_only(real.parent):
                report.add(path, "read_only", "the file or its folder is read-only: left alone")
                return
            try:
                def record(sha: str) -> None:
                    with sm.begin() as s:
                        s.add(MetadataWrite(image_id=image_id, path=str(real), sha256=sha,
                                            model_version=want.model_version))
                write_embedded(et, real, args, record)
                report.add(path, "embedded")
                return
            except Unwritable as e:
                fell_back = f"this format cannot hold XMP ({e}): written to {sidecar.name} instead"
        if read_only(sidecar.parent) or sidecar.exists() and read_only(sidecar):
            report.add(sidecar, "read_only", "the sidecar or its folder is read-only: left alone")
            return
        write_sidecar(et, sidecar, args)
        report.add(sidecar, "fell_back_to_sidecar" if fell_back else "sidecar", fell_back)
    except OSError as e:
        report.add(path, "error", str(e))


def write_s3_sidecars(sm: sessionmaker, tool: Callable[[], Any], job_ids: list[int],
                      min_score: float = KEYWORD_MIN_SCORE) -> Report:
    """The worker, after captioning: KEY.xmp beside each S3 image of a batch that asked for
    sidecars, merged into the one already there. An object whose ETag changed is skipped.
    `tool()` gives the exiftool process, asked for only when a batch wants sidecars."""
    report = Report()
    if not job_ids:
        return report
    with sm() as s:
        ids = set(s.scalars(select(Job.image_id).join(BatchImage, BatchImage.image_id == Job.image_id)
                            .join(Batch, Batch.id == BatchImage.batch_id)
                            .where(Job.id.in_(job_ids), Job.status == "done", Batch.write_metadata == "sidecar",
                                   Batch.model_version == Job.model_version)))
        if not ids:
            return report
        versions = dict(s.execute(select(Job.image_id, Job.model_version).where(Job.id.in_(job_ids))).all())
        rows = [r for r in s.execute(queries.results_query().where(Image.id.in_(ids))).all()
                if r[0].uri.startswith("s3://") and r[1].model_version == versions.get(r[0].id)]
    if rows:
        _write_s3(tool(), rows, min_score, report, check_etag=True)
    return report


def write_s3_prefix(sm: sessionmaker, et: Any, bucket: str, prefix: str, limit: int, tenant: str = "default",
                    model_version: str | None = None, min_score: float = KEYWORD_MIN_SCORE) -> Report:
    """`captioner write-metadata s3://bucket/prefix`: sidecars for objects captioned earlier, each
    found by its ETag (an object rewritten since has another and is reported as changed)."""
    report = Report()
    objects = [o for o in storage.list_prefix(bucket, prefix, limit) if not o.key.endswith(".xmp")]  # the sidecars
    rows: list[Any] = []
    for start in range(0, len(objects), queries.CHUNK):
        page = {f"s3:{o.bucket}/{o.key}@{o.etag}": o for o in objects[start:start + queries.CHUNK]}
        with sm() as s:
            found = s.execute(queries.results_query(model_version).where(
                Image.tenant == tenant, Image.fingerprint.in_(list(page)))).all()
            known = set(s.scalars(select(Image.uri).where(Image.tenant == tenant,
                                                          Image.uri.in_([o.uri for o in page.values()]))))
        rows += found
        seen = {image.fingerprint for image, _, _ in found}
        for fingerprint, o in page.items():
            if fingerprint not in seen:
                report.add(o.uri, *(("changed", "the object changed since it was captioned: skipped") if o.uri in known
                                    else ("not_captioned", "no caption for this object")))
    _write_s3(et, rows, min_score, report, check_etag=False)
    return report


def _write_s3(et: Any, rows: list[Any], min_score: float, report: Report, check_etag: bool) -> None:
    """KEY.xmp beside each (image, caption, decision)'s object, merged into the one already there."""
    with tempfile.TemporaryDirectory(prefix="captioner-xmp-") as work:
        for n, (image, caption, decision) in enumerate(rows):
            bucket, key = storage.split_s3(image.uri)
            if check_etag and image.fingerprint != f"s3:{bucket}/{key}@{storage.head(bucket, key).etag}":
                report.add(image.uri, "changed", "the object changed since it was captioned: skipped")
                continue
            local = Path(work) / f"{n}.xmp"
            target = f"{image.uri}.xmp"
            if storage.exists(target):
                local.write_bytes(storage.read(target, 16 * 1024 * 1024))
            side = read(et, [local]).get(local) if local.exists() else None
            if local.exists() and (why := sidecar_problem(side)):
                report.add(target, "corrupt_sidecar", f"existing sidecar kept, not replaced: {why}")
                continue
            args, _ = plan(side or Found(), wanted(caption, decision, min_score), overwrite=False)
            if not args:
                report.add(target, "unchanged")
                continue
            try:
                write_sidecar(et, local, args)
            except OSError as e:
                report.add(target, "error", str(e))
                continue
            storage.write(target, local.read_bytes())
            report.add(target, "sidecar")
