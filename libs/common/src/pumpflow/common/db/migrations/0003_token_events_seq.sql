-- The highest seq ever stored, read by the feed on start (the floor a mint it no longer
-- holds goes on from), is an index lookup instead of a scan of the whole history.
CREATE INDEX token_events_seq_idx ON token_events (seq);
