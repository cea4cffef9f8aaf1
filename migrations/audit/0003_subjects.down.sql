-- mhv:run-as audit_owner
-- Rows about users, deliveries and credentials cannot be kept without their subject columns:
-- they would read as task rows, and their hashes would no longer verify. The log is
-- append-only, so reverting is refused while any such row exists.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM task_audit_log WHERE subject_kind <> 'task') THEN
        RAISE EXCEPTION 'audit rows about users, deliveries or credentials exist: reverting would break the chain'
            USING ERRCODE = 'object_in_use',
                  HINT = 'The audit log is append-only; restore a backup taken before 0003 instead.';
    END IF;
END
$$;
DROP INDEX idx_task_audit_log_subject;
ALTER TABLE task_audit_log
    DROP CONSTRAINT task_audit_log_subject,
    DROP COLUMN subject_id,
    DROP COLUMN subject_kind;
