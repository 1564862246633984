-- 0011: history is pruned in `seq` order (the order it was written in), in bounded batches, so
-- `work_history (at)` is no longer read by anything. It cost every claim and every finish one
-- more index insert (two per job, of about twenty) only for the pruner. A row whose `at` is
-- older than the cut-off but comes after a newer one (another process's clock behind) waits for
-- the rows before it.
DROP INDEX work_history_at;
