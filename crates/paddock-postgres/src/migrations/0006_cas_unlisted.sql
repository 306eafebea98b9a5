-- Blobs unlisted because the object store turned out to have lost them, and when.
-- Servers answer FindMissingBlobs from memory for blobs whose leases they saw
-- renewed lately (paddock-postgres's cas_fresh), which no collection can take;
-- such a blob can still be unlisted this way, so a lookup reads the recent rows
-- here and probes what they name. Rows go once older than any lease is trusted.
CREATE TABLE cas_unlisted (
    hash bytea NOT NULL,
    size int8 NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cas_unlisted_at ON cas_unlisted (at);
