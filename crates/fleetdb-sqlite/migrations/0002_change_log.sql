-- 0002 change log: one row per mutation, keyed by the global revision. Mirrored in
-- fleetdb-postgres/migrations/0002_change_log.sql (which also creates the revision sequence;
-- here the single writer counts revisions itself).
CREATE TABLE changes (
    revision  INTEGER PRIMARY KEY,
    namespace TEXT NOT NULL,
    kind      TEXT NOT NULL,
    id        TEXT NOT NULL,
    entity    TEXT NOT NULL,
    name      TEXT NOT NULL,
    op        TEXT NOT NULL,
    old_value TEXT,
    new_value TEXT,
    at        INTEGER NOT NULL
);
-- "every change after R in namespace N (and kind K)" is a range scan of this index.
CREATE INDEX changes_scope ON changes (namespace, kind, revision);
