-- User profiles. Portable across SQLite and PostgreSQL: ids are UUIDv7 strings (lexical order is
-- creation order, which list pagination relies on), times are epoch milliseconds.
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    -- Normalised (trimmed, lower-cased) by the service, so uniqueness ignores case.
    email TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL,
    create_time BIGINT NOT NULL,
    update_time BIGINT NOT NULL
);
