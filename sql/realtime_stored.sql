-- Stored broadcasts: what lets a broadcast be kept in realtime.messages and replayed to a
-- private channel that joins later (config.broadcast.replay).
--
--   client send / httpSend with persist ─▶ walcast INSERTs the row AS THE CLIENT'S ROLE
--     (the INSERT policies decide, as for realtime.send), with skip_broadcast = true because
--     walcast already delivered it live: its WAL copy is not delivered a second time
--   realtime.send(..., private => true) / realtime.send_binary(...) / a direct INSERT by a
--     role the INSERT policies accept ─▶ a row like any other; delivered from the WAL
--   join with replay ─▶ the newest rows of the topic since `since`, oldest first
--
-- Columns added here (existing installs are upgraded in place):
--   binary_payload  bytea        a binary broadcast (realtime.send_binary); payload is NULL then
--   expires_at      timestamptz  when the row may be deleted (httpSend persist[ttl]); NULL:
--                                after walcast's --messages-retention-secs
--   skip_broadcast  boolean      already delivered live by walcast; the WAL copy is not
--
-- walcast deletes rows whose expires_at has passed or that are older than the retention,
-- whichever comes first (the retention bounds every row, a ttl can only shorten it).
--
-- Idempotent: safe to apply at every start.

CREATE SCHEMA IF NOT EXISTS realtime;

ALTER TABLE realtime.messages ADD COLUMN IF NOT EXISTS binary_payload bytea;
ALTER TABLE realtime.messages ADD COLUMN IF NOT EXISTS expires_at timestamptz;
ALTER TABLE realtime.messages ADD COLUMN IF NOT EXISTS skip_broadcast boolean NOT NULL DEFAULT false;

-- Replay reads the newest private broadcast rows of one topic.
CREATE INDEX IF NOT EXISTS messages_replay_idx
  ON realtime.messages (topic, inserted_at DESC)
  WHERE private AND extension = 'broadcast';

-- The retention job finds rows with an expiry by it.
CREATE INDEX IF NOT EXISTS messages_expires_at_idx
  ON realtime.messages (expires_at)
  WHERE expires_at IS NOT NULL;

-- Broadcast a binary payload: delivered as a kind 4 frame with binary encoding to vsn 2.0.0
-- members (vsn 1.0.0 cannot carry it and gets nothing). Same rules as realtime.send: the
-- caller's INSERT policies decide, failures are a WARNING, never an error.
CREATE OR REPLACE FUNCTION realtime.send_binary(
  payload bytea,
  event text,
  topic text,
  private boolean DEFAULT true
) RETURNS void
LANGUAGE plpgsql
VOLATILE
SECURITY INVOKER
AS $send_binary$
DECLARE
  message_id uuid := gen_random_uuid();
BEGIN
  PERFORM set_config('realtime.topic', topic, true);
  INSERT INTO realtime.messages (id, topic, extension, event, payload, binary_payload, private)
  VALUES (message_id, topic, 'broadcast', event, NULL, payload, coalesce(private, true));
EXCEPTION WHEN OTHERS THEN
  RAISE WARNING 'ErrorSendingBroadcastMessage: %', SQLERRM;
END;
$send_binary$;

COMMENT ON FUNCTION realtime.send_binary(bytea, text, text, boolean) IS
  'Broadcast a binary payload as event on topic when the current transaction commits, if the caller may insert it into realtime.messages (walcast).';
