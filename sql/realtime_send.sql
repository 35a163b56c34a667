-- Broadcast from SQL: realtime.send() and realtime.broadcast_changes().
--
--   realtime.send(payload, event, topic, private)
--     └─ pg_logical_emit_message(true, 'realtime.broadcast', {topic, event, payload, private, id})
--          transactional: written to the WAL with the transaction, decoded by pgoutput
--          (messages 'true') only if the transaction commits, in commit order
--     └─ walcast's replication pump → broadcast to the topic's channels:
--          vsn 2.0.0: binary kind 4, metadata {"id": <uuid>}; vsn 1.0.0: text with "meta"
--
-- Nothing is stored: no table grows, nothing needs cleaning up. Like the reference server's
-- realtime.send, the payload gets an "id" member when it has none, `realtime.topic` is set
-- for the rest of the transaction, and failures become a WARNING instead of an error (a
-- broadcast never aborts the caller's transaction).
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
AS $send$
DECLARE
  message_id uuid := gen_random_uuid();
  body jsonb := payload;
BEGIN
  IF jsonb_typeof(body) = 'object' AND NOT (body ? 'id') THEN
    body := body || jsonb_build_object('id', message_id);
  END IF;
  PERFORM set_config('realtime.topic', topic, true);
  PERFORM pg_catalog.pg_logical_emit_message(
    true,
    'realtime.broadcast',
    pg_catalog.jsonb_build_object(
      'topic', topic,
      'event', event,
      'payload', body,
      'private', coalesce(private, true),
      'id', message_id
    )::text
  );
EXCEPTION WHEN OTHERS THEN
  RAISE WARNING 'ErrorSendingBroadcastMessage: %', SQLERRM;
END;
$send$;

COMMENT ON FUNCTION realtime.send(jsonb, text, text, boolean) IS
  'Broadcast payload as event on topic when the current transaction commits (walcast).';

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
