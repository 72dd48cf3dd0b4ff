-- What trading last announced of each circuit breaker and of the trading state (its
-- trading.breaker and trading.state events), written in the transaction that stores the
-- announcing event in the outbox (trading's ledger.py): a replica taking over starts with
-- every breaker clear and its state computed afresh, and announces where that differs
-- from these rows, and nothing where it does not.
CREATE TABLE trading_announced (
    -- 'state', or 'breaker:' and the breaker's name
    subject     text PRIMARY KEY,
    -- the trading state; of a breaker, 'tripped' or 'clear'
    said        text NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now()
);
