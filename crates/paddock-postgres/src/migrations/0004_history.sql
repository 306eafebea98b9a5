-- What the farm remembers of recent builds for its web pages (paddock-history):
-- every change is a row, appended in batches by the server that made it and read
-- by the others in id order. A build report replaces its invocation's earlier one,
-- so only the newest row of kind 'build' per invocation is kept. Rows go when the
-- [history] bounds no longer keep them (by age, and invocations by count).
CREATE TABLE history_entries (
    id bigserial PRIMARY KEY,
    writer text NOT NULL,
    at timestamptz NOT NULL,
    kind text NOT NULL,
    identity text,
    invocation text,
    entry text NOT NULL
);
CREATE INDEX history_entries_invocation ON history_entries (identity, invocation)
    WHERE invocation IS NOT NULL;
CREATE INDEX history_entries_at ON history_entries (at);
