-- The feed deletes the token events older than its keep every hour, and Postgres reuses
-- their space for new rows only once a vacuum has passed them. Autovacuum's default
-- waits for a fifth of the table to be dead: at a week's keep, a day and a half of
-- deleted rows, so the table would settle about 20% above the keep. A twentieth keeps
-- it within about 5% (a vacuum every eight hours of prunes). Changing the option takes
-- a lock writes do not wait for.
ALTER TABLE token_events SET (autovacuum_vacuum_scale_factor = 0.05);
