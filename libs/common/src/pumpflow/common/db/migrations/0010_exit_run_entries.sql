-- An entry order of trading in flight during a graceful exit is listed among the run's
-- positions as a placeholder (position id 'entry:<order id>') that keeps the run open
-- until the entry is refused or its position is listed; then it is withdrawn, with no
-- line in the summary.
ALTER TABLE exit_run_positions DROP CONSTRAINT exit_run_positions_state_check;
ALTER TABLE exit_run_positions ADD CONSTRAINT exit_run_positions_state_check
    CHECK (state IN ('open', 'exited', 'ended', 'withdrawn'));
