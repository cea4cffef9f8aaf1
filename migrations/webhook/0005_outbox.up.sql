-- Operators' actions on deliveries are audited like task changes: each writes its audit event
-- here in the transaction of the change, and the gateway's outbox relay delivers it to the
-- audit service (mhv_common.outbox; the same columns as the task outbox). Every event is about
-- a delivery (subject_kind 'delivery', subject_id its id); task_id is 0.
CREATE TABLE outbox (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     uuid        NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    task_id      bigint      NOT NULL DEFAULT 0 CHECK (task_id = 0),
    event_type   text        NOT NULL CHECK (event_type IN ('delivery_retried')),
    user_id      uuid        NOT NULL,
    details      jsonb       NOT NULL,
    request_id   text        NOT NULL DEFAULT '',
    traceparent  text        NOT NULL DEFAULT '',
    occurred_at  timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,
    subject_kind text        NOT NULL CHECK (subject_kind = 'delivery'),
    subject_id   text        NOT NULL CHECK (subject_id <> '')
);

-- The relay's work queue: undelivered events in commit order, and each subject's.
CREATE INDEX idx_outbox_pending ON outbox (id) WHERE delivered_at IS NULL;
CREATE INDEX idx_outbox_pending_subject ON outbox (task_id, subject_id, id)
    WHERE delivered_at IS NULL;
CREATE INDEX idx_outbox_delivered_at ON outbox (delivered_at) WHERE delivered_at IS NOT NULL;
