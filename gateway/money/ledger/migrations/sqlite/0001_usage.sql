-- One row per request (and per async job); append-only. Money is exact decimal text.
CREATE TABLE usage (
    row_id        TEXT PRIMARY KEY,
    at            TEXT NOT NULL,          -- ISO-8601 UTC, microseconds
    request_id    TEXT NOT NULL,
    key_name      TEXT NOT NULL,
    route         TEXT NOT NULL,
    backend       TEXT,
    attempts      INTEGER NOT NULL,
    images        INTEGER NOT NULL,
    megapixels    TEXT NOT NULL,
    estimated_usd TEXT NOT NULL,
    billed_usd    TEXT,
    billed_source TEXT,
    status        INTEGER NOT NULL
);
CREATE INDEX usage_at ON usage (at);
CREATE INDEX usage_key_at ON usage (key_name, at);
CREATE TRIGGER usage_no_update BEFORE UPDATE ON usage BEGIN SELECT RAISE(ABORT, 'the usage ledger is append-only'); END;
CREATE TRIGGER usage_no_delete BEFORE DELETE ON usage BEGIN SELECT RAISE(ABORT, 'the usage ledger is append-only'); END;
