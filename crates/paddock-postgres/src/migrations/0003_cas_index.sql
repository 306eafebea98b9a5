-- The index of blobs an object store holds (storage.backend = "s3"): a row appears
-- only once the store has the blob durably. last_access is the blob's lease: renewed
-- when it is written, read or found, to within a small fraction of the lease.
-- Renewals are most of the writes, so last_access has no index of its own and the
-- pages keep room: a renewal is then a heap-only update that touches no index.
-- Collection, once a minute on one server, scans the table instead.
CREATE TABLE cas_blobs (
    hash bytea NOT NULL,
    size bigint NOT NULL,
    stored_at timestamptz NOT NULL DEFAULT now(),
    last_access timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (hash, size)
) WITH (fillfactor = 70);

-- Blobs a collection unlisted and is deleting from the store; a writer of one
-- waits until it is gone. A row older than a few minutes belongs to a collector
-- that died, and the next collection finishes it.
CREATE TABLE cas_collecting (
    hash bytea NOT NULL,
    size bigint NOT NULL,
    since timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (hash, size)
);
