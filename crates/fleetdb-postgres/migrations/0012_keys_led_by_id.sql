-- 0012: the indexes that are only ever probed by a whole object key (tags, claims, backoffs and
-- an object's history) lead with `id`, the column that tells keys apart. Led by
-- (namespace, kind), every comparison of a B-tree descent compared two equal columns first and
-- reached `id` only by walking the tuple's variable-length columns (PostgreSQL caches the offset
-- of the first column only): text-key comparisons were ~20 % of PostgreSQL's CPU in the
-- burn-down benchmark. Each of these indexes is read only with every key column fixed by
-- equality (a probe, or an object's tags or history in `name` / `seq` order), so the order of the
-- key columns changes no result. `objects` keeps (namespace, kind, id): listings scan its ranges.
-- Each new key is a full index build while the table is locked (docs/design.md §6: on a large
-- fleet, run `fleetdb migrate up` in a maintenance window).
ALTER TABLE tags DROP CONSTRAINT tags_pkey, ADD PRIMARY KEY (id, namespace, kind, name);
ALTER TABLE work DROP CONSTRAINT work_pkey, ADD PRIMARY KEY (id, namespace, kind, process);
ALTER TABLE work_backoff DROP CONSTRAINT work_backoff_pkey,
    ADD PRIMARY KEY (id, namespace, kind, process);
DROP INDEX work_history_object;
CREATE INDEX work_history_object ON work_history (id, namespace, kind, seq);
