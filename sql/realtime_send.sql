-- Broadcast from SQL: realtime.send() and realtime.broadcast_changes().
--
--   realtime.send(payload, event, topic, private)
--     └─ INSERT INTO realtime.messages (topic, extension 'broadcast', event, payload, private)
--          as the CALLING role: the table's INSERT policies decide who may broadcast to a
--          topic (the table owner and superusers, e.g. triggers run by them, always may)
--     └─ committed rows reach walcast through the WAL like any other change, in commit order,
--          and go to the topic's channels (nothing for a rolled-back transaction):
--          vsn 2.0.0: binary kind 4, metadata {"id": <uuid>}; vsn 1.0.0: text with "meta"
--
-- Why a row and not a bare logical message: pg_logical_emit_message can be called by any
-- role and carries no trustworthy author, so walcast would have to deliver forgeries. A row
-- in realtime.messages exists only if its author passed the INSERT policies, which is the
-- authorization Supabase uses for database broadcasts. walcast deletes rows past the
-- retention (--messages-retention-secs) on a schedule.
--
-- Like the reference server's realtime.send, the payload gets an "id" member when it has
-- none, `realtime.topic` is set for the rest of the transaction, and failures (no INSERT
-- policy for the topic, among others) become a WARNING instead of an error: a broadcast
-- never aborts the caller's transaction.
--
-- Idempotent: safe to apply at every start.

CREATE SCHEMA IF NOT EXISTS realtime;

CREATE OR REPLACE FUNCTION realtime.send(
  payload jsonb,
  event text,
  topic text,
  private boolean DEFAULT true
) RETURNS void
LANGUAGE plpgsql
VOLATILE
SECURITY INVOKER
AS $send$
DECLARE
  message_id uuid := gen_random_uuid();
  body jsonb := payload;
BEGIN
  IF jsonb_typeof(body) = 'object' AND NOT (body ? 'id') THEN
    body := body || jsonb_build_object('id', message_id);
  END IF;
  PERFORM set_config('realtime.topic', topic, true);
  INSERT INTO realtime.messages (id, topic, extension, event, payload, private)
  VALUES (message_id, topic, 'broadcast', event, body, coalesce(private, true));
EXCEPTION WHEN OTHERS THEN
  RAISE WARNING 'ErrorSendingBroadcastMessage: %', SQLERRM;
END;
$send$;

COMMENT ON FUNCTION realtime.send(jsonb, text, text, boolean) IS
  'Broadcast payload as event on topic when the current transaction commits, if the caller may insert it into realtime.messages (walcast).';

-- Trigger helper: broadcasts a row change as {schema, table, operation, record, old_record}.
CREATE OR REPLACE FUNCTION realtime.broadcast_changes(
  topic_name text,
  event_name text,
  operation text,
  table_name text,
  table_schema text,
  new record,
  old record,
  level text DEFAULT 'ROW'
) RETURNS void
LANGUAGE plpgsql
VOLATILE
AS $changes$
DECLARE
  row_new jsonb := NULL;
  row_old jsonb := NULL;
BEGIN
  IF level = 'ROW' THEN
    IF operation IN ('INSERT', 'UPDATE') THEN
      row_new := to_jsonb(new);
    END IF;
    IF operation IN ('UPDATE', 'DELETE') THEN
      row_old := to_jsonb(old);
    END IF;
  END IF;
  PERFORM realtime.send(
    jsonb_build_object(
      'schema', table_schema,
      'table', table_name,
      'operation', operation,
      'record', row_new,
      'old_record', row_old
    ),
    event_name,
    topic_name
  );
END;
$changes$;

COMMENT ON FUNCTION realtime.broadcast_changes(text, text, text, text, text, record, record, text) IS
  'Trigger helper: realtime.send({schema, table, operation, record, old_record}, event, topic) (private).';

-- Rows are found by age when the retention job deletes them.
CREATE INDEX IF NOT EXISTS messages_inserted_at_idx ON realtime.messages (inserted_at);
