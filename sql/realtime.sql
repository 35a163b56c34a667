-- The realtime schema: what private channels are authorized against.
--
-- Applied by `walcast serve` at startup when missing, or by `walcast migrate`. Idempotent:
-- running it again changes nothing.
--
-- Private channels (`config.private: true`) are authorized by row-level security on
-- realtime.messages. walcast probes the policies in a transaction that is always rolled
-- back: a SELECT policy that lets the token's role see a row with
-- (topic = <channel>, extension = 'broadcast' | 'presence') grants read access, an INSERT
-- policy that accepts such a row grants write access. During the probe, realtime.topic()
-- returns the channel name and auth-style claims are set (request.jwt.claims, ...).
--
-- Example policy:
--   CREATE POLICY "members read their room" ON realtime.messages FOR SELECT
--     TO authenticated
--     USING ((SELECT realtime.topic()) = 'room:' || (current_setting('request.jwt.claims', true)::jsonb ->> 'sub')
--            AND extension IN ('broadcast', 'presence'));

CREATE SCHEMA IF NOT EXISTS realtime;

CREATE TABLE IF NOT EXISTS realtime.messages (
    id          uuid        NOT NULL,
    topic       text        NOT NULL,
    extension   text        NOT NULL,
    event       text,
    payload     jsonb,
    private     boolean     DEFAULT true,
    inserted_at timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id)
);

-- Default deny: without policies, nobody may read or write any topic.
ALTER TABLE realtime.messages ENABLE ROW LEVEL SECURITY;

-- The channel being authorized (set locally by walcast during a check), or NULL.
CREATE OR REPLACE FUNCTION realtime.topic() RETURNS text
    LANGUAGE sql STABLE
    AS $$ SELECT nullif(current_setting('realtime.topic', true), '') $$;

-- Every role reaches the schema and may try to read or write messages; the row-level
-- security policies decide which rows (none without a policy), so granting to PUBLIC opens
-- nothing by itself and roles created later need no extra grant.
GRANT USAGE ON SCHEMA realtime TO PUBLIC;
GRANT SELECT, INSERT ON realtime.messages TO PUBLIC;
