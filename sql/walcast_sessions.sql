-- Session resume across walcast restarts: one row per channel of a socket opened with a
-- session_id, written by walcast about once a second (see ARCHITECTURE.md, "Sessions").
--
--   acked      the position of the last delivery the client surely saw; a restarted
--              walcast replays the slot from there for this channel (walcast keeps the
--              slot's confirmed position at or below every live session's acked)
--   parked_at  when its socket went away (NULL while it is connected)
--   role, claims  what its deliveries are authorized as until the client rejoins
--
-- UNLOGGED: it never reaches the WAL, so it never feeds back into the publication, and
-- writing it costs no WAL. Postgres empties it when it recovers from a crash of its own (not
-- after a clean restart); walcast notices the missing marker row and tells rejoining sessions
-- to resync for one window (see ARCHITECTURE.md, "Sessions").
--
-- It holds token claims: only walcast (the table's owner) reads or writes it.
--
-- Idempotent: safe to apply at every start.

CREATE SCHEMA IF NOT EXISTS realtime;

CREATE UNLOGGED TABLE IF NOT EXISTS realtime.walcast_sessions (
    session_id text        NOT NULL,
    who        text        NOT NULL,
    topic      text        NOT NULL,
    role       text        NOT NULL,
    claims     text        NOT NULL,
    vsn        text        NOT NULL,
    private    boolean     NOT NULL,
    entries    text        NOT NULL,
    broadcast  boolean     NOT NULL,
    acked      text        NOT NULL,
    parked_at  timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, who, topic)
);

REVOKE ALL ON realtime.walcast_sessions FROM PUBLIC;
