-- Billing: one account per user (in one currency) and the ledger of every money movement.
-- Portable SQL: runs unchanged on SQLite and PostgreSQL. Amounts are minor units, times are
-- milliseconds since the Unix epoch.

CREATE TABLE IF NOT EXISTS accounts (
    user_id       TEXT PRIMARY KEY,
    currency_code TEXT NOT NULL,
    balance_minor BIGINT NOT NULL CHECK (balance_minor >= 0),
    create_ms     BIGINT NOT NULL,
    update_ms     BIGINT NOT NULL
);

-- `id` is a UUID v7, so ordering by id is ordering by creation (what pagination relies on).
CREATE TABLE IF NOT EXISTS payments (
    id                  TEXT PRIMARY KEY,
    user_id             TEXT NOT NULL REFERENCES accounts (user_id),
    kind                TEXT NOT NULL CHECK (kind IN ('TOP_UP', 'CHARGE', 'REFUND')),
    currency_code       TEXT NOT NULL,
    amount_minor        BIGINT NOT NULL CHECK (amount_minor > 0),
    idempotency_key     TEXT NOT NULL UNIQUE,
    refunded_payment_id TEXT NULL REFERENCES payments (id),
    reference           TEXT NOT NULL DEFAULT '',
    create_ms           BIGINT NOT NULL
);

-- ListPayments: a user's payments, newest first.
CREATE INDEX IF NOT EXISTS payments_user_id_id ON payments (user_id, id);
-- Refund: the sum already refunded of one charge.
CREATE INDEX IF NOT EXISTS payments_refunded_payment_id ON payments (refunded_payment_id);
