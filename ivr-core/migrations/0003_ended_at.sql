-- Retention deletes ended calls oldest first (CALL_RETENTION_DAYS, `ivr-server purge`): each
-- batch finds its calls through this index instead of reading the whole table.
CREATE INDEX calls_ended_at ON calls (ended_at, call_id) WHERE ended_at IS NOT NULL;
