"""Caption search: one interface, two back-ends (PostgreSQL full-text search, SQLite FTS5), the
same results. microblog's search.py is the model: callers never see how matching is done.

The user's query is parsed here into terms (words, "quoted phrases", -exclusions) and each
back-end's query text is written from those terms alone, never from the raw input: a stray
quote, `NEAR(`, `col:word` or `*` cannot reach a query parser as syntax."""
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, column, func, literal_column, select, table
from sqlalchemy.orm import Session, aliased

from .errors import InvalidRequest
from .tables import Caption, Image

MAX_QUERY_CHARS = 200
MAX_OFFSET = 10_000  # deep pages cost a scan of every match before them
WORD = re.compile(r"[^\W_]+")  # letters and digits of any script; the rest separates words
CHUNK = re.compile(r'(-?)"([^"]*)"?|(-?)([^\s"]+)')  # "a phrase" (closed or not) or a run without blanks
# Relative weights of caption text, alt text and tag labels. PostgreSQL's ts_rank takes them
# per label D, C, B, A (the migration labels caption A, alt text B, tags C).
PG_WEIGHTS = "{0.1, 0.3, 0.4, 1.0}"
SQLITE_WEIGHTS = (1.0, 0.4, 0.3)  # bm25 per column: caption, alt_text, tags
FTS5_TOKENIZER = "porter unicode61 remove_diacritics 2"  # what migration b1d2search01 indexes with


@dataclass(frozen=True)
class Term:
    words: tuple[str, ...]  # one word, or a phrase: these words next to each other in this order
    excluded: bool = False


def parse(query: str) -> list[Term]:
    """Terms of a user's query. A run of characters without blanks is a phrase of its words
    ("dog's" is dog + s, as both indexes tokenize it); characters that are not letters or digits
    only separate words. Raises InvalidRequest when there is nothing to search for."""
    if "\x00" in query:
        raise InvalidRequest("the query contains a NUL character")
    if len(query) > MAX_QUERY_CHARS:
        raise InvalidRequest(f"the query is {len(query)} characters long; at most {MAX_QUERY_CHARS} are allowed")
    terms: list[Term] = []
    for m in CHUNK.finditer(query):
        minus, text = (m.group(1), m.group(2)) if m.group(2) is not None else (m.group(3), m.group(4))
        words = tuple(w.lower() for w in WORD.findall(text))
        term = Term(words, excluded=minus == "-")
        if words and term not in terms:
            terms.append(term)
    if not terms:
        raise InvalidRequest("the query has no words to search for (letters or digits)")
    return terms


def query_index(session: Session, query: str, limit: int, offset: int = 0,
                tenant: str = "default") -> list[dict[str, Any]]:
    """Captioned images of `tenant` matching `query`, best first: every word and phrase in the
    newest caption, its alt text or tags (stemmed: "dogs" finds "dog"), none of the -exclusions. Exclusions
    alone match nothing. Raises InvalidRequest for a query with no words, over MAX_QUERY_CHARS
    characters or holding a NUL."""
    terms = parse(query)
    if not 0 <= offset <= MAX_OFFSET:
        raise InvalidRequest(f"offset must be between 0 and {MAX_OFFSET}")
    wanted = [t for t in terms if not t.excluded]
    if not wanted:
        return []
    excluded = [t for t in terms if t.excluded]
    build = _postgres if session.get_bind().dialect.name == "postgresql" else _sqlite
    # an image re-captioned by a newer model is found by its newest caption only, once
    other = aliased(Caption)
    newest = select(func.max(other.id)).where(other.image_id == Caption.image_id).correlate(Caption).scalar_subquery()
    stmt = build(wanted, excluded).where(Image.tenant == tenant, Caption.id == newest).limit(limit).offset(offset)
    # an upload's file name when it has one
    return [{"id": r.id, "source": r.name or r.uri, "caption": r.text, "alt_text": r.alt_text,
             "tags": [{"label": label, "score": score} for label, score in r.tags],
             "score": round(float(r.score), 6), "confidence": r.confidence, "quality": r.quality,
             "model_version": r.model_version}
            for r in session.execute(stmt)]


def _columns(score: Any) -> Select:
    return select(Image.id, Image.uri, Image.name, Caption.text, Caption.alt_text, Caption.tags, Caption.confidence,
                  Caption.quality, Caption.model_version, score.label("score"))


def _postgres(wanted: list[Term], excluded: list[Term]) -> Select:
    # websearch_to_tsquery on text we wrote: each term quoted, so it is a word or a phrase
    # (stemmed, stop words dropped), and `or` between the exclusions is its OR operator
    def tsquery(text: str) -> Any:
        return func.websearch_to_tsquery(literal_column("'english'::regconfig"), text)

    vector = literal_column("captions.search_vector")
    wanted_q = tsquery(" ".join(_quoted(t) for t in wanted))
    rank = func.ts_rank(literal_column(f"'{PG_WEIGHTS}'::float4[]"), vector, wanted_q)
    stmt = (_columns(rank).join(Caption, Caption.image_id == Image.id)
            .where(vector.op("@@")(wanted_q)))
    if excluded:
        # a separate query: if the wanted terms are all stop words, "-cat" alone must not match
        stmt = stmt.where(~vector.op("@@")(tsquery(" or ".join(_quoted(t) for t in excluded))))
    return stmt.order_by(rank.desc(), Caption.confidence.desc(), Caption.id)


def _sqlite(wanted: list[Term], excluded: list[Term]) -> Select:
    fts = table("captions_fts", column("rowid"))
    match = fts5_query(wanted, excluded)
    bm25 = func.bm25(literal_column("captions_fts"), *SQLITE_WEIGHTS)  # lower is better
    return (_columns(-bm25).select_from(fts).join(Caption, Caption.id == fts.c.rowid)
            .join(Image, Image.id == Caption.image_id)
            .where(literal_column("captions_fts").op("MATCH")(match))
            .order_by(bm25, Caption.confidence.desc(), Caption.id))


def fts5_query(wanted: list[Term], excluded: list[Term]) -> str:
    """FTS5 query syntax from terms only: quoted strings (no quote can be inside one), AND, NOT."""
    return " AND ".join(_quoted(t) for t in wanted) + "".join(f" NOT {_quoted(t)}" for t in excluded)


def _quoted(term: Term) -> str:
    return '"' + " ".join(term.words) + '"'
