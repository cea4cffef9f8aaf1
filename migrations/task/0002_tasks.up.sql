-- Tasks, their idempotency keys, full-text search, and the audit outbox.

CREATE TYPE task_status AS ENUM ('pending', 'in_progress', 'completed', 'cancelled', 'blocked');
CREATE TYPE task_priority AS ENUM ('low', 'medium', 'high', 'critical');

CREATE TABLE tasks (
    id                  bigint        GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    title               varchar(200)  NOT NULL CHECK (char_length(title) BETWEEN 1 AND 200),
    description         text          CHECK (char_length(description) <= 5000),
    repository          varchar(100)  NOT NULL CHECK (repository ~ '^[A-Za-z0-9_-]+$'),
    priority            task_priority NOT NULL DEFAULT 'medium',
    status              task_status   NOT NULL DEFAULT 'pending',
    -- The status to return to on UnblockTask.
    status_before_block task_status,
    deadline            timestamptz,
    created_by          uuid          NOT NULL REFERENCES users (id) ON DELETE RESTRICT,
    assigned_to         uuid          REFERENCES users (id) ON DELETE SET NULL,
    metadata            jsonb         NOT NULL DEFAULT '{}'::jsonb,
    blocked_reason      text,
    cancel_reason       text,
    quality_gate        jsonb,
    created_at          timestamptz   NOT NULL DEFAULT now(),
    updated_at          timestamptz   NOT NULL DEFAULT now(),
    started_at          timestamptz,
    completed_at        timestamptz,
    -- Incremented by every change; the etag is derived from it.
    version             bigint        NOT NULL DEFAULT 1,
    -- AIP-155 idempotency: "<requester>:<request_id>", and a fingerprint of the request body
    -- so that reusing an id for a different request is refused.
    request_key         text          UNIQUE,
    request_fingerprint text,
    search_vector       tsvector      GENERATED ALWAYS AS (
        setweight(to_tsvector('english', coalesce(title, '')), 'A')
        || setweight(to_tsvector('english', coalesce(description, '')), 'B')
    ) STORED
);

-- The plan's composite indexes for the common queries.
CREATE INDEX idx_tasks_status_priority ON tasks (status, priority);
CREATE INDEX idx_tasks_repository_status ON tasks (repository, status);
CREATE INDEX idx_tasks_assigned_status ON tasks (assigned_to, status) WHERE assigned_to IS NOT NULL;
-- ON DELETE RESTRICT and "tasks I created" look tasks up by author.
CREATE INDEX idx_tasks_created_by ON tasks (created_by);
CREATE INDEX idx_tasks_search ON tasks USING gin (search_vector);

-- One row per committed task mutation, written in the mutation's own transaction and relayed
-- to the audit service. Delivered rows are kept a while for inspection, then purged.
CREATE TABLE outbox (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     uuid        NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    task_id      bigint      NOT NULL,
    event_type   text        NOT NULL CHECK (event_type IN (
                     'task_created', 'task_updated', 'task_deleted', 'task_assigned',
                     'task_started', 'task_completed', 'task_cancelled', 'task_blocked',
                     'task_unblocked')),
    user_id      uuid        NOT NULL,
    details      jsonb       NOT NULL,
    request_id   text        NOT NULL DEFAULT '',
    traceparent  text        NOT NULL DEFAULT '',
    occurred_at  timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz
);

-- The relay's work queue: undelivered events in commit order.
CREATE INDEX idx_outbox_pending ON outbox (id) WHERE delivered_at IS NULL;
CREATE INDEX idx_outbox_pending_task ON outbox (task_id, id) WHERE delivered_at IS NULL;
CREATE INDEX idx_outbox_delivered_at ON outbox (delivered_at) WHERE delivered_at IS NOT NULL;
