-- Which transaction listed each blob. A server keeps a filter of the blobs listed
-- below a horizon of transactions (paddock-postgres's cas_filter) and asks the
-- table only about digests the filter may hold, and about rows listed at or above
-- the horizon. Renewals do not change the column, so they stay heap-only updates.
-- On a large table the index takes a while: past the servers' statement timeout.
SET LOCAL statement_timeout = 0;
ALTER TABLE cas_blobs ADD COLUMN admitted xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX cas_blobs_admitted ON cas_blobs (admitted);
