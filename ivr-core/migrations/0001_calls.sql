-- Calls and their transition history. The same DDL runs on SQLite and PostgreSQL: ids are
-- UUID text, instants are microseconds since the Unix epoch (UTC) in a BIGINT.

CREATE TABLE calls (
    call_id         TEXT PRIMARY KEY,
    phone_number    TEXT NOT NULL,
    context         TEXT NOT NULL,
    extension       TEXT NOT NULL,
    priority        BIGINT NOT NULL,
    caller_id       TEXT,
    timeout_secs    BIGINT NOT NULL,
    audio           TEXT,
    variables       TEXT NOT NULL,          -- a JSON object of channel variables
    created_at      BIGINT NOT NULL,
    max_attempts    BIGINT NOT NULL,
    idempotency_key TEXT UNIQUE,
    status          TEXT NOT NULL,
    channel         TEXT,
    dialed_at       BIGINT,
    ringing_at      BIGINT,
    answered_at     BIGINT,
    ended_at        BIGINT,
    failure_reason  TEXT,
    hangup_cause    BIGINT,
    hangup_text     TEXT,
    attempt_number  BIGINT NOT NULL,
    -- How many rows of call_transitions belong to the call. Every change appends at least
    -- one, so it doubles as the optimistic-concurrency version of the row.
    version         BIGINT NOT NULL
);

-- Keyset pagination, newest first.
CREATE INDEX calls_created_at ON calls (created_at, call_id);
CREATE INDEX calls_phone_number ON calls (phone_number, created_at);
-- Reconciliation reads the active calls only; they are few among many.
CREATE INDEX calls_active ON calls (status) WHERE status IN ('pending', 'dialing', 'ringing', 'answered');

CREATE TABLE call_transitions (
    call_id         TEXT NOT NULL REFERENCES calls (call_id) ON DELETE CASCADE,
    seq             BIGINT NOT NULL,        -- 0-based position in the call's history
    status          TEXT NOT NULL,
    at              BIGINT NOT NULL,
    attempt         BIGINT NOT NULL,
    failure_reason  TEXT,
    cause           TEXT NOT NULL,
    PRIMARY KEY (call_id, seq)
);
