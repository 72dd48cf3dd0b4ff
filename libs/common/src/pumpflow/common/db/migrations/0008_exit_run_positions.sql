-- Which positions a graceful exit covers, across every exit replica: a run is finished
-- when every partition has listed the positions it holds and none of them is still
-- open. The change that makes it so and the run's finish are one transaction, so
-- whichever replica sells the last tranche (or lists the last partition) finishes it,
-- exactly once, with the summary of every position.
ALTER TABLE exit_runs ADD COLUMN partitions integer NOT NULL DEFAULT 1;

CREATE TABLE exit_run_partitions (
    run_id          text NOT NULL REFERENCES exit_runs (run_id),
    partition       integer NOT NULL,
    PRIMARY KEY (run_id, partition)
);

CREATE TABLE exit_run_positions (
    run_id          text NOT NULL REFERENCES exit_runs (run_id),
    position_id     text NOT NULL,
    mint            text NOT NULL,
    -- open: still selling; exited: sold out; ended: what the deadline left unsold
    state           text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'exited', 'ended')),
    -- its line of the summary (an ExitLine as JSON) once no longer open
    line            jsonb,
    closed_at       double precision,
    PRIMARY KEY (run_id, position_id)
);
