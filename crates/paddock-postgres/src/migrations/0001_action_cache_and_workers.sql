-- The ActionCache: instance, action digest -> result. Hash-partitioned by the
-- action's hash, so that partitions can be spread (and, later, moved to other
-- machines) without touching the key.
CREATE TABLE action_cache (
    instance_name text NOT NULL,
    action_hash bytea NOT NULL,
    action_size bigint NOT NULL,
    result bytea NOT NULL,
    -- The worker that produced it, for invalidation by worker.
    worker text NOT NULL,
    stored_at timestamptz NOT NULL,
    -- Updated at most once a minute per entry, so that hits stay reads.
    last_hit_at timestamptz,
    PRIMARY KEY (instance_name, action_hash, action_size)
) PARTITION BY HASH (action_hash);

DO $$
BEGIN
    FOR i IN 0..15 LOOP
        EXECUTE format(
            'CREATE TABLE action_cache_p%s PARTITION OF action_cache
             FOR VALUES WITH (MODULUS 16, REMAINDER %s)', i, i);
    END LOOP;
END $$;

-- Least recently used first when the cache is over its bound.
CREATE INDEX action_cache_last_use ON action_cache ((coalesce(last_hit_at, stored_at)));

-- Every worker's health record (standing, quarantine, window, totals, last seen)
-- and the identity its name is bound to. A server writes a record only at the
-- version it last read or wrote, so no server overwrites another's news. Versions
-- come from one sequence, so a deleted and re-made row never repeats one; `writer`
-- says which server process wrote the row last. The record's shape changes only
-- with a migration.
CREATE SEQUENCE worker_record_versions;
CREATE TABLE worker_records (
    name text PRIMARY KEY,
    record jsonb NOT NULL,
    identity text,
    version bigint NOT NULL,
    writer text NOT NULL,
    saved_at timestamptz NOT NULL
);
