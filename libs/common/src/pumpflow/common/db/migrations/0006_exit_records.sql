-- The exit service's records (services/exit, records.py): every exit order with its
-- outcome, and each graceful exit. A graceful exit's tranche is stored before it is
-- sent, so a restart knows every tranche number taken (order ids are
-- <position_id>:exit:<n>) and sends none twice; a rule's sale (<position_id>:rule:<n>)
-- is stored when it is settled.
CREATE TABLE exit_runs (
    run_id          text PRIMARY KEY,
    reason          text NOT NULL,
    started_at      double precision NOT NULL,
    deadline        double precision NOT NULL,
    finished_at     double precision,
    -- the summary's exit.report, as JSON
    summary         jsonb,
    created_at      timestamptz NOT NULL DEFAULT now()
);
-- one graceful exit at a time: a second shutdown joins the one under way
CREATE UNIQUE INDEX exit_runs_one_open ON exit_runs ((true)) WHERE finished_at IS NULL;

CREATE TABLE exit_orders (
    order_id        text PRIMARY KEY,
    -- the graceful exit it belongs to (NULL: a rule's sale)
    run_id          text REFERENCES exit_runs (run_id),
    mint            text NOT NULL,
    position_id     text NOT NULL,
    rule            text NOT NULL,
    number          integer NOT NULL,
    token_amount    double precision NOT NULL,
    sent_at         double precision NOT NULL,
    -- the position's exit this order is part of: tokens, mark and time at its start
    tokens_at_start double precision NOT NULL,
    mark_price      double precision,
    started_at      double precision NOT NULL,
    state           text NOT NULL CHECK (state IN ('sent', 'filled', 'rejected')),
    filled_tokens   double precision,
    sol_amount      double precision,
    price           double precision,
    fee_sol         double precision,
    outcome         text NOT NULL DEFAULT '',
    settled_at      double precision
);
CREATE INDEX exit_orders_run ON exit_orders (run_id) WHERE run_id IS NOT NULL;
CREATE INDEX exit_orders_sent_at ON exit_orders (sent_at);
