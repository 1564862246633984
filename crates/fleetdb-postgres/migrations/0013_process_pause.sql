-- 0013: a process can be paused by an operator: no claim for it starts while it is paused (claims
-- already held go on and end as usual). Mirrored in the SQLite migration of the same number.
ALTER TABLE processes ADD COLUMN paused BOOLEAN NOT NULL DEFAULT false;
