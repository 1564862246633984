-- 0001 init: namespaces, objects, tags. Mirrored in fleetdb-postgres/migrations/0001_init.sql.
-- Times are microseconds since the Unix epoch; JSON is stored as canonical text.
CREATE TABLE fleetdb_meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO fleetdb_meta (key, value) VALUES ('compacted_revision', 0);

CREATE TABLE namespaces (
    name       TEXT PRIMARY KEY,
    labels     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    revision   INTEGER NOT NULL
);
INSERT INTO namespaces (name, labels, created_at, updated_at, revision)
VALUES ('default', '{}', CAST(strftime('%s', 'now') AS INTEGER) * 1000000,
        CAST(strftime('%s', 'now') AS INTEGER) * 1000000, 0);

CREATE TABLE objects (
    namespace  TEXT NOT NULL,
    kind       TEXT NOT NULL,
    id         TEXT NOT NULL,
    labels     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    revision   INTEGER NOT NULL,
    PRIMARY KEY (namespace, kind, id)
) WITHOUT ROWID;

CREATE TABLE tags (
    namespace  TEXT NOT NULL,
    kind       TEXT NOT NULL,
    id         TEXT NOT NULL,
    name       TEXT NOT NULL,
    value      TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    revision   INTEGER NOT NULL,
    PRIMARY KEY (namespace, kind, id, name)
) WITHOUT ROWID;
