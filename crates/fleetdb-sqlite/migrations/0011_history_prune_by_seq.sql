-- 0011: history is pruned in `seq` order, in bounded batches; `work_history (at)` served only
-- the pruner (see the PostgreSQL migration of the same number).
DROP INDEX work_history_at;
