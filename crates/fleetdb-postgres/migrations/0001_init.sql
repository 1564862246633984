-- FleetDB PostgreSQL schema, migration 1: metadata, namespaces, objects and tags.
-- Table and column names are identical to the SQLite backend's. Times are microseconds since the
-- Unix epoch (BIGINT); JSON is stored as TEXT. Key columns use the "C" collation so that ordering
-- and cursor comparisons are bytewise, as in SQLite, whatever the database's default collation.

CREATE TABLE fleetdb_meta (
    key   TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO fleetdb_meta (key, value) VALUES ('compacted_revision', 0);

CREATE TABLE namespaces (
    name       TEXT COLLATE "C" PRIMARY KEY,
    labels     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    revision   BIGINT NOT NULL
);
INSERT INTO namespaces (name, labels, created_at, updated_at, revision)
VALUES (
    'default',
    '{}',
    (extract(epoch from now()) * 1000000)::bigint,
    (extract(epoch from now()) * 1000000)::bigint,
    0
);

CREATE TABLE objects (
    namespace  TEXT COLLATE "C" NOT NULL,
    kind       TEXT COLLATE "C" NOT NULL,
    id         TEXT COLLATE "C" NOT NULL,
    labels     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    revision   BIGINT NOT NULL,
    PRIMARY KEY (namespace, kind, id)
);

CREATE TABLE tags (
    namespace  TEXT COLLATE "C" NOT NULL,
    kind       TEXT COLLATE "C" NOT NULL,
    id         TEXT COLLATE "C" NOT NULL,
    name       TEXT COLLATE "C" NOT NULL,
    value      TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    revision   BIGINT NOT NULL,
    PRIMARY KEY (namespace, kind, id, name)
);
