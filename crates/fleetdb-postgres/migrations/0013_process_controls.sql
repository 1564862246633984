-- 0013: operators' controls of a process. `paused`: no claim for it starts while set (claims
-- already held go on and end as usual). `max_active`: at most that many claims of it held by live
-- sessions at once (NULL: no limit). Mirrored in the SQLite migration of the same number.
ALTER TABLE processes ADD COLUMN paused BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE processes ADD COLUMN max_active BIGINT;
