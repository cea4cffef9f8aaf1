-- Every operation audited, not only task changes: what an event is about.
-- mhv:run-as audit_owner
--
-- A row is about a task (subject_kind 'task', task_id > 0, subject_id empty: every row written
-- before this migration) or about another subject named by subject_id, with task_id 0:
--   user        a user's UUID (created, deactivated, deleted in the task service)
--   delivery    a webhook delivery's UUID (an operator re-queued it from the dead letters)
--   credential  a credential's name (a signing key, a webhook secret, a database password
--               generated or rotated with `mhv keys` / `mhv secrets`)
-- The canonical encoding covers both columns whenever a row is not a plain task row
-- (docs/security/audit-logging.md), so the hashes of the rows already stored do not change.
-- Adding columns with constant defaults rewrites no row, so the append-only triggers never fire.

ALTER TABLE task_audit_log
    ADD COLUMN subject_kind varchar(32) NOT NULL DEFAULT 'task'
        CHECK (subject_kind IN ('task', 'user', 'delivery', 'credential')),
    ADD COLUMN subject_id varchar(200) NOT NULL DEFAULT '',
    ADD CONSTRAINT task_audit_log_subject CHECK (
        (subject_kind = 'task' AND subject_id = '' AND task_id > 0)
        OR (subject_kind <> 'task' AND subject_id <> '' AND task_id = 0)
    );

-- "Everything that happened to this user / delivery / credential", newest first.
CREATE INDEX idx_task_audit_log_subject ON task_audit_log (subject_kind, subject_id, id);
