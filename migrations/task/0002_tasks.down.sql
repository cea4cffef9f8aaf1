-- Drops tasks and the audit outbox.
-- mhv:loses task.tasks
-- mhv:loses task.outbox
DROP TABLE IF EXISTS outbox;
DROP TABLE IF EXISTS tasks;
DROP TYPE IF EXISTS task_priority;
DROP TYPE IF EXISTS task_status;
