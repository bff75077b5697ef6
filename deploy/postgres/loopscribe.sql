-- Loopscribe's own database (the ledger: corrections, training jobs, frozen splits) beside Label Studio's.
-- The postgres image runs this once, when it creates its data volume; for an existing volume:
--   docker compose exec postgres createdb -U labelstudio loopscribe
CREATE DATABASE loopscribe;
