-- A position trading closes by other means during a graceful exit (a hand sale, a
-- rule's sale that raced) is marked with the close's reason as the exit applies the
-- close, before its state is written: a replica that resumes the run after a crash
-- reports the position closed by trading, not left unsold.
ALTER TABLE exit_run_positions ADD COLUMN trading_closed text;
ALTER TABLE exit_run_positions ADD COLUMN trading_closed_at double precision;
