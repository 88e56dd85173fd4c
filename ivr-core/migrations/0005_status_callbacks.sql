-- Status callbacks: where a call's changes are POSTed, and the outbox of those POSTs. An
-- outbox row is written in the same transaction as the transition it tells of.
ALTER TABLE calls ADD COLUMN status_callback TEXT;
-- The selected statuses, comma-separated in progress order ('' = none).
ALTER TABLE calls ADD COLUMN status_callback_events TEXT NOT NULL DEFAULT '';

CREATE TABLE webhook_deliveries (
    event_id        TEXT PRIMARY KEY,       -- Ivr-Event-Id, the same on every attempt
    -- Deleting a call (retention) deletes its deliveries.
    call_id         TEXT NOT NULL REFERENCES calls (call_id) ON DELETE CASCADE,
    seq             BIGINT NOT NULL,        -- the history entry it tells of
    status          TEXT NOT NULL,
    url             TEXT NOT NULL,
    call_snapshot   TEXT NOT NULL,          -- the call right after the transition (JSON)
    created_at      BIGINT NOT NULL,
    state           TEXT NOT NULL,          -- pending | delivered | failed
    attempts        BIGINT NOT NULL,
    next_attempt_at BIGINT NOT NULL,
    -- A claimer holds the delivery until then; another may claim it after (a crashed sender).
    lease_until     BIGINT,
    last_attempt_at BIGINT,
    last_result     TEXT,
    UNIQUE (call_id, seq)
);

-- The worker's scan: pending deliveries by due time.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
