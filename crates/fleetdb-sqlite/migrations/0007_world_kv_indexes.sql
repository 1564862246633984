-- 0007: mirrors fleetdb-postgres/migrations/0007_world_kv_indexes.sql, which makes the World's
-- secondary indexes leave key-value rows out so that PostgreSQL's planner never picks them for a
-- key lookup. SQLite keeps its full indexes: its planner always takes the primary key for a key
-- lookup, and it cannot prove a partial index's `space <> 'kv'` from `space = 'export'`, so
-- partial indexes would go unused by the queries they serve. Nothing changes here; the version
-- moves so both backends number their migrations alike.
SELECT 1;
