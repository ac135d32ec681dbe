"""search index: a weighted tsvector + GIN on PostgreSQL, an FTS5 table kept by triggers on SQLite

Both index a caption's text (most weight), its alt text and its tag labels, stemmed (English
snowball on PostgreSQL, porter on SQLite). core/search.py is the only reader; the objects stay
out of core/tables.py's metadata (see SEARCH_INDEX_NAMES there).

Revision ID: b1d2search01
Revises: 5c12d53081cc
"""
from alembic import op

revision = "b1d2search01"
down_revision = "5c12d53081cc"
branch_labels = None
depends_on = None

# to_tsvector and jsonb_to_tsvector with an explicit configuration are immutable, so PostgreSQL
# keeps the vector itself: no trigger, no code path that could forget to fill it.
# '["string"]' takes the tag labels and leaves their scores out.
PG_VECTOR = """
    setweight(to_tsvector('english'::regconfig, text), 'A')
    || setweight(to_tsvector('english'::regconfig, alt_text), 'B')
    || setweight(jsonb_to_tsvector('english'::regconfig, tags, '["string"]'), 'C')
"""

# tags are [[label, score], ...]: the FTS row holds the labels only
SQLITE_ROW = ("new.id, new.text, new.alt_text, "
              "(SELECT group_concat(json_extract(value, '$[0]'), ' ') FROM json_each(new.tags))")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE captions ADD COLUMN search_vector tsvector GENERATED ALWAYS AS ({PG_VECTOR}) STORED")
        op.execute("CREATE INDEX ix_captions_search_vector ON captions USING gin (search_vector)")
        return
    # porter over unicode61: "dogs" finds "dog"; diacritics folded, so "cafe" finds "café"
    op.execute("CREATE VIRTUAL TABLE captions_fts USING fts5(caption, alt_text, tags, "
               "tokenize='porter unicode61 remove_diacritics 2')")
    op.execute(f"CREATE TRIGGER captions_fts_insert AFTER INSERT ON captions BEGIN "
               f"INSERT INTO captions_fts (rowid, caption, alt_text, tags) VALUES ({SQLITE_ROW}); END")
    op.execute("CREATE TRIGGER captions_fts_delete AFTER DELETE ON captions BEGIN "
               "DELETE FROM captions_fts WHERE rowid = old.id; END")
    op.execute(f"CREATE TRIGGER captions_fts_update AFTER UPDATE ON captions BEGIN "
               f"DELETE FROM captions_fts WHERE rowid = old.id; "
               f"INSERT INTO captions_fts (rowid, caption, alt_text, tags) VALUES ({SQLITE_ROW}); END")
    op.execute(f"INSERT INTO captions_fts (rowid, caption, alt_text, tags) "
               f"SELECT {SQLITE_ROW.replace('new.', 'captions.')} FROM captions")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX ix_captions_search_vector")
        op.execute("ALTER TABLE captions DROP COLUMN search_vector")
        return
    for trigger in ("captions_fts_insert", "captions_fts_delete", "captions_fts_update"):
        op.execute(f"DROP TRIGGER {trigger}")
    op.execute("DROP TABLE captions_fts")
