-- 0014: parking objects that keep failing. `processes.max_failures`: after that many failures in a
-- row an object's backoff for the process never ends until an operator clears it (NULL: retried
-- for ever). `work_backoff.failures`: failures in a row of (object, process) since it last
-- finished; a row from before this migration counts as one. Mirrored in the SQLite migration of
-- the same number.
ALTER TABLE processes ADD COLUMN max_failures BIGINT;
ALTER TABLE work_backoff ADD COLUMN failures BIGINT NOT NULL DEFAULT 1;
