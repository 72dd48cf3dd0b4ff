-- The ids that ended at a token the exit service retired (entry orders refused or
-- landed, positions closed), each with its mint and when it was stored: trading's
-- shutdown barrier may list one that ended just before the shutdown, and a replica
-- restarted since must still know it ended. Kept as long as a retired token's record.
CREATE TABLE exit_ended (
    id              text PRIMARY KEY,
    mint            text NOT NULL,
    stored_at       double precision NOT NULL
);
CREATE INDEX exit_ended_stored_at ON exit_ended (stored_at);
