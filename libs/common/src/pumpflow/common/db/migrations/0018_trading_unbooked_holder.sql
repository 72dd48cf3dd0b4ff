-- Trades of the live wallet that match no order, or sales booked to no position
-- (trading's ledger.py): the wallet and the book differ by each until an operator
-- acknowledges it (deleted then), so a
-- replica taking over shows what its predecessor saw. Rows of a day ago are deleted as
-- commits go.
CREATE TABLE trading_unbooked (
    signature   text PRIMARY KEY,
    mint        text NOT NULL,
    side        text NOT NULL,
    tokens      float8 NOT NULL,
    -- SOL the trade moved in the reserves, before fees
    sol         float8 NOT NULL,
    -- when the feed stamped the trade
    time        float8 NOT NULL,
    -- the orders whose answer never came that it may be
    candidates  text[] NOT NULL,
    -- the sale whose fill it is, booked to no position (its position closed since)
    order_id    text,
    stored_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX trading_unbooked_stored_at ON trading_unbooked (stored_at);
-- The replica trading now (trading's ledger.py): written as it takes over, before it
-- reads the ledger, and checked by every commit, so a predecessor that lost the lease
-- stores nothing after its successor read what it would change; stood_by once it
-- stepped down with every change stored, its entries withdrawn unsent among them.
CREATE TABLE trading_holder (
    name        text PRIMARY KEY,
    holder      text NOT NULL,
    stood_by    boolean NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now()
);
