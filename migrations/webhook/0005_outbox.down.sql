-- mhv:loses webhook.outbox
DROP TABLE outbox;
