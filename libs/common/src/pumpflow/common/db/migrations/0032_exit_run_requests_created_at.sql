-- The replica trading looks every few seconds for shutdown requests the exit service
-- applied and no halt of trading did (services/trading, ledger.py: those recent
-- enough, and requested since the operator's state last changed): by when each was
-- requested, so the look reads the few recent rows, not the table.
CREATE INDEX exit_run_requests_created_at ON exit_run_requests (created_at);
