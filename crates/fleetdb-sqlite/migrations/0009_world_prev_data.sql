-- 0009: nothing to do on SQLite. PostgreSQL's 0009 adds world.prev_data for its one-statement
-- key-value set (see fleetdb-postgres/migrations/0009_world_prev_data.sql); SQLite's single
-- writer reads the row it replaces in the same transaction and needs no such column. This file
-- keeps both backends at the same schema version.
SELECT 1;
