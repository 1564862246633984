-- 0008: the collector's run history. Every finished collection records its statistics here
-- (the newest 100 are kept), so any process and the CLI's `gc status` see the last runs, not
-- only the process that ran them. Mirrored in fleetdb-sqlite/migrations/0008_gc_runs.sql.
CREATE TABLE gc_runs (
    seq        BIGSERIAL PRIMARY KEY,
    started_at BIGINT NOT NULL,
    stats      TEXT NOT NULL
);
