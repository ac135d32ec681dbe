"""Search relevance, measured (`captioner bench search`).

Two corpora are captioned with the shipped model through the embedded pipeline (submit, claim,
caption, complete: what `captioner caption` runs) into SQLite files under a cache folder, once:
a second run skips every photo already captioned.
- ImageNet samples (one photo per class): each class name is a query; recall@k is how often that
  class's photo is among the first k results.
- Flickr8k dev photos: queries written from COCO captions (bench/search_queries.txt); a result is
  relevant when one of the photo's five human captions contains every query word, stemmed the
  way the SQLite index stems (FTS5 porter). Reports precision@k and how many queries found a
  relevant photo in their first k results.
With a PostgreSQL URL the same captions are copied there and measured on that back-end too."""
import dataclasses
import sqlite3
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from captioner.core import captioner, jobs, queries, search
from captioner.migrations import open_database
from captioner.core.settings import Settings
from captioner.core.tables import Caption, Image

QUERIES = Path(__file__).with_name("search_queries.txt")
Log = Callable[[str], None]


def caption_corpus(settings: Settings, database: Path, photos: list[Path],
                   on_batch: Callable[[jobs.BatchReport], None]) -> sessionmaker:
    """`photos` captioned into the SQLite file `database` (only those not yet captioned)."""
    url = f"sqlite:///{database.resolve()}"
    sm = open_database(url)
    embedded = dataclasses.replace(settings, database_url=url, broker_url=None)
    version = captioner.version(embedded)
    jobs.submit_images(sm, [jobs.file_image(p) for p in photos], version, "backfill", lambda _: None)
    jobs.run_embedded(sm, embedded, version, None, on_batch)
    return sm


def class_queries(labels: Path) -> list[tuple[str, str]]:
    """(photo file name, query) per ImageNet class: the first of the class's names."""
    rows = [line.split("\t") for line in labels.read_text().splitlines()[1:] if line.strip()]
    return [(row[0], row[3].split(",")[0].strip()) for row in rows]


def read_queries(path: Path) -> list[str]:
    return [q for line in path.read_text().splitlines() if (q := line.strip()) and not q.startswith("#")]


def human_captions(token_file: Path, names: set[str]) -> list[tuple[str, str]]:
    """(photo name, caption) for the Flickr8k photos in `names`, from `name.jpg#n<TAB>caption` lines."""
    out = []
    for line in token_file.read_text().splitlines():
        key, _, text = line.partition("\t")
        name = key.split("#")[0]
        if name in names:
            out.append((name, text))
    return out


def relevance_judge(captions: list[tuple[str, str]]) -> Callable[[str], set[str]]:
    """query -> names of the photos one of whose human captions holds every query word, stemmed.
    The captions go in an in-memory FTS5 table with the index's tokenizer: the same stemmed-word test."""
    db = sqlite3.connect(":memory:")
    db.execute(f"CREATE VIRTUAL TABLE human USING fts5(name UNINDEXED, caption, tokenize='{search.FTS5_TOKENIZER}')")
    db.executemany("INSERT INTO human (name, caption) VALUES (?, ?)", captions)

    def relevant(query: str) -> set[str]:
        terms = [search.Term(t.words) for t in search.parse(query) if not t.excluded]
        every_word = [search.Term((w,)) for t in terms for w in t.words]  # words, in any order
        return {name for (name,) in db.execute("SELECT name FROM human WHERE human MATCH ?",
                                               (search.fts5_query(every_word, []),))}
    return relevant


def copy_captions(source: sessionmaker, target: sessionmaker, tenant: str) -> None:
    """The captions of `source` written into `target` under `tenant`, through the write path the
    workers use (submit, claim, complete); a second copy finds every job done and writes nothing."""
    with source() as s:
        rows = s.execute(select(Image, Caption).join(Caption, Caption.image_id == Image.id)).all()
    by_fingerprint = {image.fingerprint: (image, cap) for image, cap in rows}
    for version in {cap.model_version for _, cap in rows}:
        mine = [(i, c) for i, c in rows if c.model_version == version]
        with target.begin() as s:
            submitted = queries.submit(s, [queries.NewImage(i.uri, i.fingerprint, i.sha256, i.size) for i, _ in mine],
                                       version, "backfill", tenant=tenant)
            claimed = queries.claim(s, version, 600, len(submitted), job_ids=[x.job_id for x in submitted])
            fingerprints = {x.image_id: i.fingerprint for x, (i, _) in zip(submitted, mine)}
            results = []
            for c in claimed:
                image, cap = by_fingerprint[fingerprints[c.image_id]]
                results.append(queries.Result(c, cap.text, cap.alt_text, cap.candidates, cap.tags, cap.confidence,
                                              cap.needs_review, image.width or 0, image.height or 0, quality=cap.quality))
            queries.complete(s, results, [], version, forward_size=0)


def top_names(sm: sessionmaker, query: str, k: int, tenant: str = "default") -> list[str]:
    with sm() as s:
        return [Path(r["source"]).name for r in search.query_index(s, query, k, tenant=tenant)]


def imagenet_recall(sm: sessionmaker, classes: list[tuple[str, str]], k: int,
                    tenant: str = "default") -> dict[str, Any]:
    ranks, empty = [], 0
    for name, query in classes:
        found = top_names(sm, query, k, tenant)
        ranks.append(found.index(name) + 1 if name in found else None)
        empty += not found
    n = len(ranks)
    return {"queries": n, "recall@1": round(sum(r == 1 for r in ranks) / n, 4),
            f"recall@{k}": round(sum(r is not None for r in ranks) / n, 4), "no_results": empty}


def coco_precision(sm: sessionmaker, query_list: list[str], relevant: Callable[[str], set[str]], k: int,
                   log: Log, tenant: str = "default") -> dict[str, Any]:
    log(f"{'query':<32} {'relevant photos':>15} {f'relevant in top {k}':>15}")
    hits, answerable = [], 0
    for query in query_list:
        wanted = relevant(query)
        answerable += bool(wanted)
        hit = sum(name in wanted for name in top_names(sm, query, k, tenant))
        hits.append(hit)
        log(f"{query:<32} {len(wanted):>15} {hit:>15}")
    n = len(query_list)
    return {"queries": n, f"precision@{k}": round(sum(hits) / (k * n), 4),
            f"found_relevant_in_top{k}": sum(h > 0 for h in hits), "answerable": answerable}


def run(settings: Settings, imagenet: Path, flickr: Path, queries_file: Path, cache: Path, k: int,
        log: Log, on_batch: Callable[[jobs.BatchReport], None], postgres_url: str | None = None) -> dict[str, Any]:
    pg = open_database(postgres_url) if postgres_url else None  # refused now, not after the captioning
    cache.mkdir(parents=True, exist_ok=True)
    classes = class_queries(imagenet / "labels.tsv")
    log(f"captioning {len(classes)} ImageNet samples into {cache / 'imagenet.db'} (skips those done)")
    imagenet_sm = caption_corpus(settings, cache / "imagenet.db", [imagenet / "images" / n for n, _ in classes],
                                 on_batch)
    dev = [line.strip() for line in (flickr / "Flickr_8k.devImages.txt").read_text().splitlines() if line.strip()]
    log(f"captioning {len(dev)} Flickr8k dev photos into {cache / 'flickr8k-dev.db'} (skips those done)")
    flickr_sm = caption_corpus(settings, cache / "flickr8k-dev.db", [flickr / "images" / n for n in dev], on_batch)
    judge = relevance_judge(human_captions(flickr / "Flickr8k.token.txt", set(dev)))
    query_list = read_queries(queries_file)
    backends = {"sqlite": (imagenet_sm, flickr_sm, "default", "default")}
    if pg is not None:
        # one database, the two corpora kept apart as two tenants
        copy_captions(imagenet_sm, pg, "bench-imagenet")
        copy_captions(flickr_sm, pg, "bench-flickr8k-dev")
        backends["postgresql"] = (pg, pg, "bench-imagenet", "bench-flickr8k-dev")
    out: dict[str, Any] = {"model_version": captioner.version(settings), "k": k}
    for name, (imagenet_db, flickr_db, imagenet_tenant, flickr_tenant) in backends.items():
        log(f"\n{name}")
        out[name] = {"imagenet_class_names": imagenet_recall(imagenet_db, classes, k, imagenet_tenant),
                     "coco_queries_on_flickr8k_dev": coco_precision(flickr_db, query_list, judge, k, log,
                                                                    flickr_tenant)}
    return out
