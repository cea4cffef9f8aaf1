-- Drops the inbox: replay-protection records, deliveries and their sagas.
-- mhv:loses webhook.saga_log
-- mhv:loses webhook.deliveries
-- mhv:loses webhook.dedup
DROP TABLE IF EXISTS saga_log;
DROP TABLE IF EXISTS deliveries;
DROP TABLE IF EXISTS dedup;
