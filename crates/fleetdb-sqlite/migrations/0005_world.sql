-- 0005 the World: exported resources, key-values, per-host maps, deploys and their blobs,
-- scheduler registrations and schedules, all in one table told apart by `space` (the columns
-- each space uses are documented on fleetdb_core::world::Space). Mirrored in
-- fleetdb-postgres/migrations/0005_world.sql.
CREATE TABLE world (
    space           TEXT NOT NULL,
    key             TEXT NOT NULL,
    scope           TEXT NOT NULL,
    owner           TEXT NOT NULL,
    kind            TEXT NOT NULL,
    name            TEXT NOT NULL,
    target          TEXT NOT NULL,
    data            BLOB NOT NULL,
    meta            TEXT,
    session_id      TEXT,
    expires_at      INTEGER,
    create_revision INTEGER NOT NULL,
    revision        INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
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
