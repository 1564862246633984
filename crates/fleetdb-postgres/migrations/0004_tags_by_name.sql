-- 0004 an index of tags by name, so selectors that require a tag (`has(eligible) and …`) start
-- from the objects that have it instead of scanning every object. Mirrored in
-- fleetdb-sqlite/migrations/0004_tags_by_name.sql.
CREATE INDEX tags_by_name ON tags (name, namespace, kind, id);
