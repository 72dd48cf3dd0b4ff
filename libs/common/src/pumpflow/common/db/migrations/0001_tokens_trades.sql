-- Tokens and raw token events, field for field as PumpPortal sends them.
-- Numbers are double precision: PumpPortal sends JSON floats or integers and the
-- payload column keeps the exact frame for byte-exact replays.

CREATE TABLE tokens (
    mint                    text PRIMARY KEY,
    signature               text NOT NULL UNIQUE,
    creator                 text NOT NULL,
    name                    text NOT NULL,
    symbol                  text NOT NULL,
    uri                     text NOT NULL,
    created_at              double precision NOT NULL,
    initial_buy             double precision NOT NULL,
    v_sol_in_bonding_curve  double precision NOT NULL,
    v_tokens_in_bonding_curve double precision NOT NULL,
    market_cap_sol          double precision NOT NULL,
    pool                    text,
    is_mayhem_mode          boolean,
    migrated_at             double precision
);

-- Every token event (create, buy, sell, migrate) in arrival order.
CREATE TABLE token_events (
    id          bigserial PRIMARY KEY,
    signature   text NOT NULL,
    tx_type     text NOT NULL,
    mint        text NOT NULL,
    event_time  double precision NOT NULL,
    seq         bigint,
    source      text NOT NULL,
    event_id    text NOT NULL,
    trader      text,
    sol_amount  double precision,
    token_amount double precision,
    v_sol_in_bonding_curve double precision,
    v_tokens_in_bonding_curve double precision,
    market_cap_sol double precision,
    payload     jsonb NOT NULL,
    -- a migrate frame shares no signature with a trade, but be explicit: one row per
    -- (signature, tx_type) so a creation frame and its embedded buy never collide
    UNIQUE (signature, tx_type)
);

CREATE INDEX token_events_time_idx ON token_events (event_time, id);
CREATE INDEX token_events_mint_time_idx ON token_events (mint, event_time, id);
