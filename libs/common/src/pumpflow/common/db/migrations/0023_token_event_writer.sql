-- The writer whose numbered token events are stored, per publisher (the feed's
-- recorder.py): written as a feed replica takes the PumpPortal lease over, before it
-- reads the seqs it goes on from, and checked last in every write of numbered events
-- (read shared, so a take-over waits for a write that checked to commit). A holder that
-- lost the lease with events numbered and not yet stored (a frozen process, a slow
-- store) is refused then: its events are stored without their seqs, which its
-- successor gives to its own, and are not published.
CREATE TABLE token_event_writer (
    publisher   text PRIMARY KEY,
    writer      text NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now()
);
