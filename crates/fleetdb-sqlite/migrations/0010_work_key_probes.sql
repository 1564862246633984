-- 0010: the per-process indexes of claims and backoffs are followed by the key, as on
-- PostgreSQL (see fleetdb-postgres/migrations/0010_work_key_probes.sql): a probe of one claim or
-- backoff by its full key is an exact lookup in every index that can serve it, and listings per
-- process come in key order.
DROP INDEX work_process;
CREATE INDEX work_process ON work (process, namespace, kind, id);
DROP INDEX work_backoff_process;
CREATE INDEX work_backoff_process ON work_backoff (process, namespace, kind, id);
