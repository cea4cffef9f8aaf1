ALTER TABLE issue_links DROP COLUMN state_at;
ALTER TABLE deliveries DROP COLUMN content_type;
