-- The shutdown requests whose halt trading stored (services/trading, ledger.py), in the
-- write of that halt: a shutdown seen again under its id (redelivered after a restart, a
-- copy published again) halts nothing again, an operator's resume since standing.
CREATE TABLE trading_shutdown_requests (
    request_id  text PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
