-- Seqs the feed gave to token events the store refused (dead-lettered, to be redriven
-- once their cause is fixed). A restarted feed numbers each mint above these too, so a
-- redriven event never shares its seq with a later one of its mint.
CREATE TABLE token_event_refusals (
    event_id    text PRIMARY KEY,
    mint        text NOT NULL,
    seq         bigint NOT NULL,
    source      text NOT NULL,
    event_time  double precision NOT NULL
);
CREATE INDEX token_event_refusals_seq_idx ON token_event_refusals (seq);
