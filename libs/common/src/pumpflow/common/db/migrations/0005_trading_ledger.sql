-- Trading's ledger (services/trading, ledger.py): every order with its state, every
-- fill, every position, and the operator's trading state (the kill switch). A change
-- is written in one transaction with the book's. The order id is the primary key: an
-- order derived from an event that comes again (a redelivery, a restart) is refused
-- here, so it is never sent twice.
CREATE TABLE orders (
    order_id            text PRIMARY KEY,
    mint                text NOT NULL,
    side                text NOT NULL CHECK (side IN ('buy', 'sell')),
    sol_amount          double precision,
    token_amount        double precision,
    slippage_pct        double precision NOT NULL,
    reason              text NOT NULL DEFAULT '',
    position_id         text,
    -- the event the order was derived from
    cause_id            text,
    executor            text NOT NULL,
    -- pending: stored, not yet handed to the executor; sent: handed over, outcome not
    -- known; unknown: the executor could not say (a timeout); filled; rejected
    state               text NOT NULL
        CHECK (state IN ('pending', 'sent', 'unknown', 'filled', 'rejected')),
    requested_at        double precision NOT NULL,
    -- the market the decision saw: the venue and its reserves
    venue               text NOT NULL,
    expected_v_sol      double precision,
    expected_v_tokens   double precision,
    signature           text,
    outcome             text NOT NULL DEFAULT '',
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_unresolved ON orders (requested_at)
    WHERE state IN ('pending', 'sent', 'unknown');
CREATE INDEX orders_requested_at ON orders (requested_at);

CREATE TABLE fills (
    seq             bigserial PRIMARY KEY,
    order_id        text NOT NULL UNIQUE REFERENCES orders (order_id),
    mint            text NOT NULL,
    side            text NOT NULL CHECK (side IN ('buy', 'sell')),
    token_amount    double precision NOT NULL,
    sol_amount      double precision NOT NULL,
    price           double precision NOT NULL,
    fee_sol         double precision NOT NULL,
    signature       text,
    position_id     text,
    filled_at       double precision NOT NULL
);

CREATE TABLE positions (
    position_id         text PRIMARY KEY,
    mint                text NOT NULL,
    opened_at           double precision NOT NULL,
    closed_at           double precision,
    close_reason        text NOT NULL DEFAULT '',
    token_amount        double precision NOT NULL,
    cost_sol            double precision NOT NULL,
    entry_price         double precision NOT NULL,
    realized_pnl_sol    double precision NOT NULL,
    fees_sol            double precision NOT NULL,
    mark_price          double precision,
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX positions_open ON positions (mint) WHERE closed_at IS NULL;

-- the operator's trading state: a halt outlives a restart and reaches the leader
-- whichever replica took it
CREATE TABLE trading_control (
    name        text PRIMARY KEY,
    state       text NOT NULL CHECK (state IN ('active', 'reducing', 'halted')),
    reason      text NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now()
);
