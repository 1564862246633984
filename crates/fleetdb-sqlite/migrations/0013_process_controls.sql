-- 0013: operators' controls of a process. `paused`: no claim for it starts while set (claims
-- already held go on and end as usual). `max_active`: at most that many claims of it held by live
-- sessions at once (NULL: no limit). Mirrored in the PostgreSQL migration of the same number.
ALTER TABLE processes ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;
ALTER TABLE processes ADD COLUMN max_active INTEGER;
