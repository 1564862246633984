-- 0012: nothing to do on SQLite (the PostgreSQL migration of the same number rebuilds the
-- indexes probed by a whole object key so that they lead with `id`). Its reason is PostgreSQL's
-- own: a B-tree comparison there reaches a column behind a variable-length one by walking the
-- tuple, column by column. Here the same keys are the clustering keys of WITHOUT ROWID tables
-- (tags, work, work_backoff): changing them means copying those tables, for a gain nobody has
-- measured on SQLite. The version is taken so that both backends keep one numbering.
SELECT 1;
