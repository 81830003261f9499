-- Signing keys rotate: each key has a generation, one more than the key it replaces, and at most
-- one key per generation exists. Two replicas that find the same key due for replacement both
-- try to insert the next generation; exactly one succeeds and the other adopts its key.
-- Keys stored before this migration are numbered in the order they were created.

ALTER TABLE signing_keys ADD COLUMN generation BIGINT;

UPDATE signing_keys SET generation = (
    SELECT COUNT(*) FROM signing_keys AS older
    WHERE older.create_ms < signing_keys.create_ms
       OR (older.create_ms = signing_keys.create_ms AND older.kid < signing_keys.kid)
);

CREATE UNIQUE INDEX IF NOT EXISTS signing_keys_by_generation ON signing_keys (generation);
