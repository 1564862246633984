-- 0007: the World's secondary indexes, and the change log's scope index, leave key-values out.
--
-- Key-values are only ever found by their key (the primary key). Every key-value row shared one
-- entry ('kv', '', …) in each of these indexes, so it cost three index writes per new key for
-- nothing, and with the statistics of a freshly filled table the planner could pick one of them
-- for a key lookup (a generic plan scanning every key-value row). Queries of the other spaces
-- name their space as a literal, which proves the predicate. Mirrored in
-- fleetdb-sqlite/migrations/0007_world_kv_indexes.sql.
DROP INDEX world_owner;
CREATE INDEX world_owner ON world (space, owner) WHERE space <> 'kv';
DROP INDEX world_scope;
CREATE INDEX world_scope ON world (space, scope) WHERE space <> 'kv';
DROP INDEX world_target;
CREATE INDEX world_target ON world (space, target, kind) WHERE space <> 'kv';

-- The change log's scope index serves filtered reads (a watch catching up on one namespace).
-- Key-value changes leave it: one index write less per `kv set`, the hottest write; a filtered
-- read of the key-values' own namespace scans the primary key from its revision instead. Readers
-- of other namespaces add `namespace <> '.kv'` to their text, so generic plans can use it.
DROP INDEX changes_scope;
CREATE INDEX changes_scope ON changes (namespace, kind, revision) WHERE namespace <> '.kv';
