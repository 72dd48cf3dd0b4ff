-- Trading numbers its keyed events (order.*, position.*) per mint, in the transaction
-- of the ledger change that causes them (trading's ledger.py): a rolled-back change
-- takes its numbers back, and a replica taking over numbers on above its predecessor.
CREATE TABLE trading_seqs (
    mint    text PRIMARY KEY,
    -- the last seq given to an event of the mint
    seq     bigint NOT NULL
);
-- The seq each event was given, by its id: a commit whose reply was lost stored them,
-- and its retry (the same events) gets the same seqs back, leaving no number unused.
-- Needed only until the retry; rows older than a day are deleted as commits go.
CREATE TABLE trading_event_seqs (
    event_id    text PRIMARY KEY,
    mint        text NOT NULL,
    seq         bigint NOT NULL,
    stored_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX trading_event_seqs_stored_at ON trading_event_seqs (stored_at);
