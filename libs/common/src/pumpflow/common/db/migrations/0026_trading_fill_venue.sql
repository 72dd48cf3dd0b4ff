-- Where each fill filled (PumpPortal's pool: the curve, or the pool a token migrated to;
-- NULL for fills stored before it was kept). A paper fill on the pool moves the pool the
-- token views follow, and those views are stored apart from the ledger, after it: a
-- replica taking over finds in the ledger the paper fills on the pool a view it loads
-- has not folded in (its holder died between the two writes) and moves the pool by them.
ALTER TABLE fills ADD COLUMN venue text;
