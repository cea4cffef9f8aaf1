-- mhv:run-as admin
DROP EXTENSION IF EXISTS vector;
