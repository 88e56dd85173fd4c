-- Several instances over one PostgreSQL (ARCHITECTURE.md, "Several instances"). The same DDL
-- runs on SQLite, where the lease only keeps a second process off the file.

-- One row per running process: its lease, renewed while it lives. `lease_id` is new at every
-- start; `instance_id` is the stable name (INSTANCE_ID) its ARI application is named after.
CREATE TABLE instances (
    lease_id    TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    app         TEXT NOT NULL,
    started_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX instances_instance_id ON instances (instance_id, expires_at);

-- The lease of the process that follows the call; NULL for calls stored before this column.
ALTER TABLE calls ADD COLUMN owner TEXT;
-- A cancel asked of an instance that does not follow the call, for its owner to carry out.
ALTER TABLE calls ADD COLUMN cancel_requested_at BIGINT;
CREATE INDEX calls_owner ON calls (owner) WHERE status IN ('pending', 'dialing', 'ringing', 'answered');

-- The calls-per-second bucket all instances share: when the next originate may go.
CREATE TABLE pacing (
    id        BIGINT PRIMARY KEY,
    next_slot BIGINT NOT NULL
);
INSERT INTO pacing (id, next_slot) VALUES (1, 0);
