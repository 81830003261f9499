-- Auth's own data: credentials (keyed by the user id users assigned), the Ed25519 keys that sign
-- access tokens, and refresh tokens, stored only as SHA-256 hashes. Times are epoch milliseconds.
-- Portable SQL: the same file runs on SQLite and PostgreSQL, and is safe to run twice.

CREATE TABLE IF NOT EXISTS credentials (
    user_id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    create_ms BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS signing_keys (
    kid TEXT PRIMARY KEY,
    private_key_pkcs8 TEXT NOT NULL,
    public_key TEXT NOT NULL,
    create_ms BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS refresh_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    family_id TEXT NOT NULL,
    expires_ms BIGINT NOT NULL,
    revoked_ms BIGINT,
    replaced_by_hash TEXT,
    create_ms BIGINT NOT NULL
);

-- Reuse of a rotated token revokes its whole family.
CREATE INDEX IF NOT EXISTS refresh_tokens_by_family ON refresh_tokens (family_id);
