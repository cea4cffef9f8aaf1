-- mhv:loses task.outbox WHERE subject_kind <> 'task'
DELETE FROM outbox WHERE subject_kind <> 'task';
DROP INDEX idx_outbox_pending_subject;
CREATE INDEX idx_outbox_pending_task ON outbox (task_id, id) WHERE delivered_at IS NULL;
ALTER TABLE outbox
    DROP CONSTRAINT outbox_subject,
    DROP CONSTRAINT outbox_event_type_check,
    ADD CONSTRAINT outbox_event_type_check CHECK (event_type IN (
        'task_created', 'task_updated', 'task_deleted', 'task_assigned',
        'task_started', 'task_completed', 'task_cancelled', 'task_blocked',
        'task_unblocked')),
    DROP COLUMN subject_id,
    DROP COLUMN subject_kind;
