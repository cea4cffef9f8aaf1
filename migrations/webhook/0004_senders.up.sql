-- Real senders: bodies that are not JSON, and issue events that arrive out of order.

-- The media type of each stored body, so the saga decodes it as it came: GitHub sends
-- application/json or, for a hook configured so, application/x-www-form-urlencoded with the
-- JSON in its `payload` field (the signature covers the form body as sent). Rows received
-- before this migration are JSON.
ALTER TABLE deliveries
    ADD COLUMN content_type text NOT NULL DEFAULT 'application/json'
        CHECK (content_type IN ('application/json', 'application/x-www-form-urlencoded'));

-- When the sender says the last state change applied to the issue's task happened (opened,
-- closed, reopened, deleted). A state change that happened before it arrived late: it is
-- recorded and ignored instead of undoing a newer one. NULL: no state change recorded yet.
ALTER TABLE issue_links ADD COLUMN state_at timestamptz;
