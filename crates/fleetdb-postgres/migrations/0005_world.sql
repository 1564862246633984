-- FleetDB PostgreSQL schema, migration 5: the World: exported resources, key-values, per-host maps, deploys and their blobs,
-- scheduler registrations and schedules, all in one table told apart by `space` (the columns
-- each space uses are documented on fleetdb_core::world::Space). Mirrored in
-- fleetdb-sqlite/migrations/0005_world.sql.
CREATE TABLE world (
    space           TEXT COLLATE "C" NOT NULL,
    key             TEXT COLLATE "C" NOT NULL,
    scope           TEXT COLLATE "C" NOT NULL,
    owner           TEXT COLLATE "C" NOT NULL,
    kind            TEXT COLLATE "C" NOT NULL,
    name            TEXT COLLATE "C" NOT NULL,
    target          TEXT COLLATE "C" NOT NULL,
    data            BYTEA NOT NULL,
    meta            TEXT,
    session_id      TEXT COLLATE "C",
    expires_at      BIGINT,
    create_revision BIGINT NOT NULL,
    revision        BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    PRIMARY KEY (space, key)
);
-- A host's own records (sync_exports, map values).
CREATE INDEX world_owner ON world (space, owner);
-- Records of one map or scheduler namespace.
CREATE INDEX world_scope ON world (space, scope);
-- What a host may collect: records to it or to '*', by kind.
CREATE INDEX world_target ON world (space, target, kind);
-- Records bound to a session (removed when it ends).
CREATE INDEX world_session ON world (session_id) WHERE session_id IS NOT NULL;
-- Records with a TTL (the sweeper removes them).
CREATE INDEX world_expiry ON world (expires_at) WHERE expires_at IS NOT NULL;
