-- User management is audited through the same outbox as task changes: an event is about a
-- task (subject_kind 'task', task_id > 0) or about a user (subject_kind 'user', subject_id
-- the user's id, task_id 0). The relay keeps each subject's events in commit order.
ALTER TABLE outbox
    ADD COLUMN subject_kind text NOT NULL DEFAULT 'task' CHECK (subject_kind IN ('task', 'user')),
    ADD COLUMN subject_id text NOT NULL DEFAULT '',
    DROP CONSTRAINT outbox_event_type_check,
    ADD CONSTRAINT outbox_event_type_check CHECK (event_type IN (
        'task_created', 'task_updated', 'task_deleted', 'task_assigned', 'task_started',
        'task_completed', 'task_cancelled', 'task_blocked', 'task_unblocked',
        'user_created', 'user_deactivated', 'user_deleted')),
    ADD CONSTRAINT outbox_subject CHECK (
        (subject_kind = 'task' AND subject_id = '' AND task_id > 0)
        OR (subject_kind = 'user' AND subject_id <> '' AND task_id = 0)
    );

DROP INDEX idx_outbox_pending_task;
CREATE INDEX idx_outbox_pending_subject ON outbox (task_id, subject_id, id)
    WHERE delivered_at IS NULL;
