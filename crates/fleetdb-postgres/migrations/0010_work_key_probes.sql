-- 0010: a probe of one claim or one backoff by its full key (namespace, kind, id, process) is an
-- exact lookup in EVERY index that can serve it. The per-process indexes led with the process
-- alone (work (process), work_backoff (process, until)); a plan made while the tables looked
-- small (no statistics: this kind of machine never vacuums or analyzes) chose them for such a
-- probe, so each finish and each claim's take read every claim or backoff the process ever had,
-- dead rows included: 536 index entries and 30 heap pages per probe after 3,000 jobs of the
-- one-at-a-time benchmark, O(jobs done) per job. Led by the process and followed by the key, the
-- index still serves listings and counts per process (now in key order) and a probe through it
-- reads one entry. The backoff index does NOT carry `until` (INCLUDE): covering every column the
-- claim's backoff test reads, it won that probe as an index-only scan of the WHOLE index, the
-- key columns being behind the process (plan-guard test claim_reads_one_backoff_row_per_candidate).
DROP INDEX work_process;
CREATE INDEX work_process ON work (process, namespace, kind, id);
DROP INDEX work_backoff_process;
CREATE INDEX work_backoff_process ON work_backoff (process, namespace, kind, id);
