-- When the originate of a call's current attempt was first sent to Asterisk. NULL means the
-- call waits in the queue and was never sent, so it may be dialled after a restart without
-- any risk of a double dial.
ALTER TABLE calls ADD COLUMN sent_at BIGINT;

-- Calls stored before this column existed may all have been sent: never dial them again.
UPDATE calls SET sent_at = COALESCE(dialed_at, created_at);
