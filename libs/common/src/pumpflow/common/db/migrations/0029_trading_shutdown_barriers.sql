-- Whether trading's barrier of each shutdown request is out (services/trading,
-- ledger.py): a replica killed after storing the halt and before publishing the barrier
-- leaves it unpublished, and the replica trading next publishes it as it takes over
-- (the exit service's graceful exit waits for it). The shutdown's reason goes with it,
-- as the barrier carries it. The requests stored before this had their barriers out.
ALTER TABLE trading_shutdown_requests
    ADD COLUMN reason text NOT NULL DEFAULT '',
    ADD COLUMN barrier_published_at timestamptz;
UPDATE trading_shutdown_requests SET barrier_published_at = applied_at;
