-- The exact frame as received. jsonb reorders keys and rewrites numbers (1e-05 comes
-- back as 0.00001 and an exponent float as an integer), so byte-exact replays read
-- this column; `payload` stays the queryable copy.
ALTER TABLE token_events ADD COLUMN frame text;

-- Transactional outbox position of each publisher: events up to `last_id` in
-- token_events are confirmed on the bus. On restart the feed republishes the rest
-- (consumers drop the duplicates by seq), so nothing stored is ever left unpublished.
CREATE TABLE token_event_outbox (
    publisher   text PRIMARY KEY,
    last_id     bigint NOT NULL
);
