-- 0003 sessions, processes, work, backoff and history. Mirrored in
-- fleetdb-postgres/migrations/0003_sessions_work.sql (which counts fencing tokens with a
-- sequence; here the single writer counts them in fleetdb_meta).
INSERT INTO fleetdb_meta (key, value) VALUES ('fencing_token', 0);

CREATE TABLE sessions (
    id           TEXT PRIMARY KEY,
    component    TEXT NOT NULL,
    host         TEXT NOT NULL,
    runtime_info TEXT NOT NULL,
    ttl_ms       INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    deadline     INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX sessions_deadline ON sessions (deadline);

CREATE TABLE processes (
    name       TEXT PRIMARY KEY,
    conflicts  TEXT NOT NULL, -- JSON array of process names
    created_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE work (
    namespace  TEXT NOT NULL,
    kind       TEXT NOT NULL,
    id         TEXT NOT NULL,
    process    TEXT NOT NULL,
    session_id TEXT NOT NULL,
    token      INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    PRIMARY KEY (namespace, kind, id, process)
) WITHOUT ROWID;
CREATE INDEX work_session ON work (session_id);
CREATE INDEX work_process ON work (process);

CREATE TABLE work_backoff (
    namespace       TEXT NOT NULL,
    kind            TEXT NOT NULL,
    id              TEXT NOT NULL,
    process         TEXT NOT NULL,
    until           INTEGER NOT NULL,
    cause           TEXT NOT NULL,
    last_interval_s INTEGER NOT NULL,
    PRIMARY KEY (namespace, kind, id, process)
) WITHOUT ROWID;
CREATE INDEX work_backoff_process ON work_backoff (process, until);

-- No foreign key to objects: history outlives the object.
CREATE TABLE work_history (
    seq        INTEGER PRIMARY KEY,
    namespace  TEXT NOT NULL,
    kind       TEXT NOT NULL,
    id         TEXT NOT NULL,
    process    TEXT NOT NULL,
    event      TEXT NOT NULL,
    session_id TEXT NOT NULL,
    component  TEXT NOT NULL,
    host       TEXT NOT NULL,
    token      INTEGER NOT NULL,
    at         INTEGER NOT NULL,
    cause      TEXT
);
CREATE INDEX work_history_object ON work_history (namespace, kind, id, seq);
CREATE INDEX work_history_process ON work_history (process, seq);
CREATE INDEX work_history_at ON work_history (at);
