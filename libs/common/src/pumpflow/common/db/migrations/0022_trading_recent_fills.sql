-- A replica taking trading over reads the fills of the positions open or closed lately,
-- not every fill stored over the weeks (trading's ledger.py): those positions by their
-- closing time, each one's opening buy (a buy of a token not held opens the position
-- named by its position id, else by its order id), then its token's fills from there on.
CREATE INDEX positions_closed_at ON positions (closed_at);
CREATE INDEX fills_opening ON fills ((coalesce(position_id, order_id)), seq) WHERE side = 'buy';
CREATE INDEX fills_mint_seq ON fills (mint, seq);
