-- Whether a stored token event began its mint's numbering afresh above the feed's floor
-- (the envelope's `renumbered`): the events the feed republishes after a crash, and
-- those replayed from here, keep the mark, so consumers take the jump for no gap.
-- Older rows are unmarked. A constant default adds the column without a rewrite.
ALTER TABLE token_events ADD COLUMN renumbered boolean NOT NULL DEFAULT false;
