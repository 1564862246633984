-- FleetDB PostgreSQL schema, migration 6: leases, collectable kinds and the content store.
-- Mirrored in fleetdb-sqlite/migrations/0006_leases_content.sql; here blob and ingest bytes are
-- chunk rows, so several servers share them.
CREATE TABLE gc_kinds (
    kind        TEXT COLLATE "C" PRIMARY KEY,
    collectable BIGINT NOT NULL,
    declared_at BIGINT NOT NULL
);

CREATE TABLE leases (
    id         TEXT COLLATE "C" PRIMARY KEY,
    labels     TEXT NOT NULL,
    flat       BIGINT NOT NULL,
    expires_at BIGINT,
    created_at BIGINT NOT NULL,
    revision   BIGINT NOT NULL
);
CREATE INDEX leases_expiry ON leases (expires_at) WHERE expires_at IS NOT NULL;

-- rtype 'object' (namespace, kind, id) or 'blob' (namespace = kind = '', id = digest).
CREATE TABLE lease_resources (
    lease_id  TEXT NOT NULL,
    rtype     TEXT NOT NULL,
    namespace TEXT NOT NULL,
    kind      TEXT NOT NULL,
    id        TEXT COLLATE "C" NOT NULL,
    added_at  BIGINT NOT NULL,
    PRIMARY KEY (lease_id, rtype, namespace, kind, id)
);

CREATE TABLE blobs (
    digest     TEXT COLLATE "C" PRIMARY KEY,
    size       BIGINT NOT NULL,
    labels     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    revision   BIGINT NOT NULL
);

CREATE TABLE ingests (
    ref             TEXT COLLATE "C" PRIMARY KEY,
    expected_digest TEXT,
    expected_size   BIGINT,
    "offset"        BIGINT NOT NULL,
    started_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL
);
CREATE INDEX ingests_expiry ON ingests (expires_at);

CREATE TABLE blob_chunks (
    digest TEXT COLLATE "C" NOT NULL,
    seq    BIGINT NOT NULL,
    data   BYTEA NOT NULL,
    PRIMARY KEY (digest, seq)
);

CREATE TABLE ingest_chunks (
    ref  TEXT COLLATE "C" NOT NULL,
    seq  BIGINT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (ref, seq)
);
