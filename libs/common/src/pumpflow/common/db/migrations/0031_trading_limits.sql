-- The risk limits an operator set on a running trading (services/trading, ledger.py),
-- one row a limit: they hold over the settings' after a restart or a take-over, until
-- the operator resets them (the rows deleted). Written by the replica trading alone,
-- fenced as its commits are (trading_holder).
CREATE TABLE trading_limits (
    name        text PRIMARY KEY,
    value       double precision NOT NULL,
    reason      text NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now()
);
