-- Cluster mode: which walcast node owns a session record (see ARCHITECTURE.md, "Sessions
-- across nodes"). '' outside cluster mode.
--
-- A node that resumes a session another node owned claims its records by setting `node` to
-- its own id in one UPDATE (row locks make two claims of one session serialize); from then
-- on the previous owner neither updates nor deletes them.
--
-- Idempotent: safe to apply at every start.

ALTER TABLE realtime.walcast_sessions ADD COLUMN IF NOT EXISTS node text NOT NULL DEFAULT '';
