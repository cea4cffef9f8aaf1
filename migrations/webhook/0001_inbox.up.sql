-- The webhook gateway's durable inbox: replay-protection records, received deliveries, and the
-- per-delivery saga log that processing workers advance.
--
-- Ingest runs ONE statement: an INSERT into dedup ... ON CONFLICT DO NOTHING RETURNING, and,
-- in the same statement (hence the same transaction), the INSERT into deliveries, which happens
-- only when every dedup key was new. There is no check-then-insert window: two identical
-- deliveries racing each other serialise on the dedup primary key and exactly one is enqueued.

-- Replay-protection records. Kept for MHV_WEBHOOK_DEDUP_RETENTION_SECONDS (default 4 days,
-- longer than any sender retries), then deleted by the gateway's purge job.
--   key_kind = 'delivery_id': the sender's delivery id (X-GitHub-Delivery, Idempotency-Key,
--              X-Gitlab-Event-UUID, webhook-id);
--   key_kind = 'body_sha256': SHA-256 of the raw body, for schemes whose signature covers only
--              the body (GitHub, GitLab secret token): a captured request resent under a fresh
--              delivery id is still recognised.
CREATE TABLE dedup (
    source      text        NOT NULL,
    key_kind    text        NOT NULL CHECK (key_kind IN ('delivery_id', 'body_sha256')),
    key         text        NOT NULL CHECK (length(key) BETWEEN 1 AND 200),
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, key_kind, key)
);
-- The purge job deletes by age.
CREATE INDEX dedup_received_at ON dedup (received_at);

-- Every verified, first-seen delivery, with the exact bytes that were signed.
CREATE TABLE deliveries (
    id              uuid        PRIMARY KEY,
    source          text        NOT NULL,
    delivery_id     text        NOT NULL CHECK (length(delivery_id) BETWEEN 1 AND 200),
    event           text        NOT NULL DEFAULT '' CHECK (length(event) <= 200),
    action          text        NOT NULL DEFAULT '' CHECK (length(action) <= 200),
    -- Non-secret request headers worth keeping (content type, user agent, sender hook ids);
    -- never signatures or tokens.
    headers         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    body            bytea       NOT NULL,
    state           text        NOT NULL DEFAULT 'pending' CHECK (
        state IN ('pending', 'processing', 'completed', 'ignored', 'compensated', 'dead_letter')
    ),
    attempts        integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text        NOT NULL DEFAULT '',
    -- W3C trace context of the receiving request, so processing continues the same trace.
    traceparent     text        CHECK (traceparent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'),
    tracestate      text        CHECK (length(tracestate) <= 512),
    received_at     timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
-- Admin listing, newest first (keyset pagination on (received_at, id)).
CREATE INDEX deliveries_newest ON deliveries (received_at DESC, id DESC);
-- Operators look deliveries up by the sender's id.
CREATE INDEX deliveries_sender_id ON deliveries (source, delivery_id);
-- Work still open: workers claim due rows; depth and lag gauges count them.
CREATE INDEX deliveries_open ON deliveries (state, next_attempt_at)
    WHERE state IN ('pending', 'processing', 'dead_letter');

-- One saga per delivery; workers hold the row with SELECT ... FOR UPDATE while they advance it.
-- The idempotency key (derived from the delivery) makes every downstream call safe to repeat.
CREATE TABLE saga_log (
    delivery_id     uuid        PRIMARY KEY REFERENCES deliveries (id) ON DELETE CASCADE,
    step            text        NOT NULL DEFAULT 'started' CHECK (length(step) BETWEEN 1 AND 64),
    state           text        NOT NULL DEFAULT 'running' CHECK (
        state IN ('running', 'completed', 'compensating', 'compensated', 'failed')
    ),
    task_id         bigint,
    user_id         uuid,
    idempotency_key text        NOT NULL UNIQUE CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
