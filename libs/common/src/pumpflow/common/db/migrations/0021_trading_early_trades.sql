-- Trades of the live wallet that showed while an order of their token and side awaited
-- the trade API's answer (trading's ledger.py): stored with the change of the event that
-- showed them, before its delivery is acknowledged, and deleted by the change that
-- stores their fill or their unbooking. The replica trading next judges those left (the
-- one that saw them went before the answer, or before it stored the fill): the stream
-- shows a trade once. Rows of a day ago are deleted as commits go.
CREATE TABLE trading_early_trades (
    signature   text PRIMARY KEY,
    -- the token.trade payload, encoded
    trade       bytea NOT NULL,
    -- SOL the trade moved in the reserves, before fees
    sol         float8 NOT NULL,
    -- when the feed stamped it
    time        float8 NOT NULL,
    stored_at   timestamptz NOT NULL DEFAULT now()
);
