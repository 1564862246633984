-- 0006 leases, collectable kinds and the content store's metadata. Mirrored in
-- fleetdb-postgres/migrations/0006_leases_content.sql (which also keeps blob and ingest bytes in
-- chunk tables; here they are files in the database's folder: blobs/sha256/<hex>, ingest/<ref>).
CREATE TABLE gc_kinds (
    kind        TEXT PRIMARY KEY,
    collectable INTEGER NOT NULL,
    declared_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE leases (
    id         TEXT PRIMARY KEY,
    labels     TEXT NOT NULL,
    flat       INTEGER NOT NULL,
    expires_at INTEGER,
    created_at INTEGER NOT NULL,
    revision   INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX leases_expiry ON leases (expires_at) WHERE expires_at IS NOT NULL;

-- rtype 'object' (namespace, kind, id) or 'blob' (namespace = kind = '', id = digest).
CREATE TABLE lease_resources (
    lease_id  TEXT NOT NULL,
    rtype     TEXT NOT NULL,
    namespace TEXT NOT NULL,
    kind      TEXT NOT NULL,
    id        TEXT NOT NULL,
    added_at  INTEGER NOT NULL,
    PRIMARY KEY (lease_id, rtype, namespace, kind, id)
) WITHOUT ROWID;

CREATE TABLE blobs (
    digest     TEXT PRIMARY KEY,
    size       INTEGER NOT NULL,
    labels     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    revision   INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE ingests (
    ref             TEXT PRIMARY KEY,
    expected_digest TEXT,
    expected_size   INTEGER,
    "offset"        INTEGER NOT NULL,
    started_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX ingests_expiry ON ingests (expires_at);
