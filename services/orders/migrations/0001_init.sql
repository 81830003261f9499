-- Orders and their items. Portable SQL: the same file runs on SQLite and PostgreSQL.
-- Ids are UUIDv7 strings, so ordering by id is ordering by creation time.

CREATE TABLE IF NOT EXISTS orders (
    id              TEXT PRIMARY KEY,
    user_id         TEXT NOT NULL,
    status          TEXT NOT NULL
        CHECK (status IN ('PENDING', 'PAID', 'PAYMENT_FAILED', 'CANCELLED')),
    currency_code   TEXT NOT NULL,
    total_minor     BIGINT NOT NULL CHECK (total_minor >= 0),
    failure_reason  TEXT,
    payment_id      TEXT,
    idempotency_key TEXT NOT NULL,
    create_ms       BIGINT NOT NULL,
    update_ms       BIGINT NOT NULL,
    UNIQUE (user_id, idempotency_key)
);

CREATE TABLE IF NOT EXISTS order_items (
    order_id         TEXT NOT NULL REFERENCES orders (id),
    position         INTEGER NOT NULL CHECK (position >= 0),
    sku              TEXT NOT NULL,
    quantity         INTEGER NOT NULL CHECK (quantity > 0),
    unit_price_minor BIGINT NOT NULL CHECK (unit_price_minor >= 0),
    PRIMARY KEY (order_id, position)
);

-- ListOrders: a user's orders, newest first.
CREATE INDEX IF NOT EXISTS orders_by_user ON orders (user_id, id);
-- Recovery: PENDING orders, oldest first.
CREATE INDEX IF NOT EXISTS orders_by_status ON orders (status, create_ms);
