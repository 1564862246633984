-- 0013: a process can be paused by an operator: no claim for it starts while it is paused (claims
-- already held go on and end as usual). Mirrored in the PostgreSQL migration of the same number.
ALTER TABLE processes ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;
