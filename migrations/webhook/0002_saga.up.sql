-- Saga processing: worker leases on deliveries, and the link from an issue to its task.

-- A worker that claims a delivery leases it; the lease is renewed at every saga step. A worker
-- that dies stops renewing, and once the lease runs out another worker resumes the saga from
-- its last recorded step.
ALTER TABLE deliveries
    ADD COLUMN leased_by    text,
    ADD COLUMN leased_until timestamptz;

-- Work ready to claim: pending, or processing under an expired lease.
CREATE INDEX deliveries_claimable ON deliveries (next_attempt_at)
    WHERE state IN ('pending', 'processing');

-- Which task stands for an issue of a sender ("owner/name#42" for GitHub,
-- "group/name#7" for GitLab). Reopening an issue links it to a new task.
CREATE TABLE issue_links (
    source       text        NOT NULL,
    external_key text        NOT NULL CHECK (length(external_key) BETWEEN 1 AND 300),
    task_id      bigint      NOT NULL,
    delivery     uuid        NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, external_key)
);
