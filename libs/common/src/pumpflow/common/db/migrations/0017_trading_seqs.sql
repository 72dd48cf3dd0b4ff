-- Trading numbers its keyed events (order.*, position.*) per mint, in the transaction
-- of the ledger change that causes them (trading's ledger.py): a rolled-back change
-- takes its numbers back, and a replica taking over numbers on above its predecessor.
CREATE TABLE trading_seqs (
    mint    text PRIMARY KEY,
    -- the last seq given to an event of the mint
    seq     bigint NOT NULL
);
-- The events numbered, with their seqs, until the service has published them: a
-- replica taking over publishes what is left (its predecessor died before publishing),
-- and a commit whose reply was lost is retried with the same events, which get the same
-- seqs back, leaving no number unused. Rows of a day ago are deleted as commits go.
CREATE TABLE trading_outbox (
    event_id    text PRIMARY KEY,
    mint        text NOT NULL,
    seq         bigint NOT NULL,
    -- the encoded envelope (its seq is the column's)
    event       bytea NOT NULL,
    stored_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX trading_outbox_stored_at ON trading_outbox (stored_at);
