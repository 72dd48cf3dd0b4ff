-- The operators' shutdown requests each graceful exit applied (services/exit, records.py):
-- a request asked again under its id (a retry of pumpflow stop, a copy published by
-- another replica) is that graceful exit's, over or not, and begins no second one.
CREATE TABLE exit_run_requests (
    request_id      text PRIMARY KEY,
    run_id          text NOT NULL REFERENCES exit_runs (run_id),
    created_at      timestamptz NOT NULL DEFAULT now()
);
