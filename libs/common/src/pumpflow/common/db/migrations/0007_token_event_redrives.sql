-- Token events the store refused once and a redrive stored later, their cause fixed.
-- The redrive publishes each one itself and records it here; the feed's outbox skips
-- them when it republishes after a restart (its position may lie on either side of
-- their rows), so each is published once however often it is redriven.
CREATE TABLE token_event_redrives (
    event_id    text PRIMARY KEY,
    published   boolean NOT NULL DEFAULT false
);
