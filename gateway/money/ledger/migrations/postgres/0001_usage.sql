-- One row per request (and per async job); append-only. Money is exact NUMERIC.
CREATE TABLE usage (
    row_id        TEXT PRIMARY KEY,
    at            TIMESTAMPTZ NOT NULL,
    request_id    TEXT NOT NULL,
    key_name      TEXT NOT NULL,
    route         TEXT NOT NULL,
    backend       TEXT,
    attempts      INTEGER NOT NULL,
    images        INTEGER NOT NULL,
    megapixels    NUMERIC(20, 8) NOT NULL,
    estimated_usd NUMERIC(20, 8) NOT NULL,
    billed_usd    NUMERIC(20, 8),
    billed_source TEXT,
    status        INTEGER NOT NULL
);
CREATE INDEX usage_at ON usage (at);
CREATE INDEX usage_key_at ON usage (key_name, at);
CREATE FUNCTION usage_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the usage ledger is append-only';
END;
$$;
CREATE TRIGGER usage_no_change BEFORE UPDATE OR DELETE ON usage FOR EACH ROW EXECUTE FUNCTION usage_append_only();
