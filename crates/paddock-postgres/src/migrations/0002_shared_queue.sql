-- The queue servers share: executions (queued, claimed by a server, running on a
-- worker, done with their response), the clients' operations that follow them, and
-- the invocations (Bazel's tool_invocation_id, any client's build) they belong to.

-- One row per invocation: who, and when (last_seen to the minute); its executions
-- name it.
CREATE TABLE invocations (
    id text PRIMARY KEY,
    identity text NOT NULL,
    first_seen timestamptz NOT NULL DEFAULT now(),
    last_seen timestamptz NOT NULL DEFAULT now()
);

-- What an execution needs of a worker (instance and platform), by a key the
-- executions name; a server claims only classes its free workers can run.
CREATE TABLE execution_classes (
    key text PRIMARY KEY,
    instance_name text NOT NULL,
    platform jsonb NOT NULL
);

CREATE TABLE executions (
    id uuid PRIMARY KEY,
    instance_name text NOT NULL,
    action_hash text NOT NULL,
    action_size bigint NOT NULL,
    class text NOT NULL,
    priority integer NOT NULL,
    invocation text NOT NULL,
    -- Its place among its invocation's executions (counted by the server that took
    -- it): the queue takes the first of every invocation, then the second, ...
    turn bigint NOT NULL,
    cacheable boolean NOT NULL,
    fingerprint bytea NOT NULL,
    -- queued -> claimed (by `replica`, under `lease_until`) -> running (on `worker`)
    -- -> done (with `response`); back to queued when a lease expires or a worker
    -- fails it.
    state text NOT NULL CHECK (state IN ('queued', 'claimed', 'running', 'done')),
    replica text,
    lease_until timestamptz,
    attempt integer NOT NULL DEFAULT 0,
    failures integer NOT NULL DEFAULT 0,
    -- Workers that failed it: others are preferred.
    avoid text[] NOT NULL DEFAULT '{}',
    worker text,
    response bytea,
    queued_at timestamptz NOT NULL DEFAULT now(),
    done_at timestamptz
);
CREATE INDEX executions_queue ON executions (class, priority, turn, queued_at)
    WHERE state = 'queued';
CREATE INDEX executions_leases ON executions (lease_until)
    WHERE state IN ('claimed', 'running');
CREATE INDEX executions_done ON executions (done_at) WHERE state = 'done';
CREATE INDEX executions_invocation ON executions (invocation);
-- One live execution per cacheable action: identical requests share it.
CREATE UNIQUE INDEX executions_live ON executions (instance_name, action_hash, action_size)
    WHERE cacheable AND state <> 'done';

CREATE TABLE operations (
    name text PRIMARY KEY,
    execution uuid NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    identity text NOT NULL,
    instance_name text NOT NULL,
    cancelled boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX operations_execution ON operations (execution);
CREATE INDEX operations_identity ON operations (identity);
