-- Drops the users table.
-- mhv:loses task.users
DROP TABLE IF EXISTS users;
