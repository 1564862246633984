-- FleetDB PostgreSQL schema, migration 2: the change log.
-- Revisions come from a sequence (PostgreSQL only: SQLite counts in its single writer). Sequence
-- values are not transactional, so revisions may have gaps and may commit out of order.

CREATE SEQUENCE fleetdb_revision;

CREATE TABLE changes (
    revision  BIGINT PRIMARY KEY,
    namespace TEXT COLLATE "C" NOT NULL,
    kind      TEXT COLLATE "C" NOT NULL,
    id        TEXT COLLATE "C" NOT NULL,
    entity    TEXT NOT NULL,
    name      TEXT COLLATE "C" NOT NULL,
    op        TEXT NOT NULL,
    old_value TEXT,
    new_value TEXT,
    at        BIGINT NOT NULL
);
CREATE INDEX changes_scope ON changes (namespace, kind, revision);
