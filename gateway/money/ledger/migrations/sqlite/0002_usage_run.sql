-- Which settle of the request a row is: 1 for a request; the run number for an async
-- job, whose run stopped at a shutdown is settled (status 499, what it spent) and the
-- run that takes it over is settled again. (request_id, run) is unique, so a row
-- delivered twice from the ledger stream is written once. Rows written before this
-- migration have no run and are left out of the index.
ALTER TABLE usage ADD COLUMN run INTEGER;
CREATE UNIQUE INDEX usage_request_run ON usage (request_id, run) WHERE run IS NOT NULL;
