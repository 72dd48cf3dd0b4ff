-- Which decision stored an order (trading's ledger.py): a commit whose reply was lost
-- may have stored it after all, and its retry, the same decision, finds the order
-- under its own attempt and sends it; an order of another attempt (a redelivered or
-- replayed event decided again) is still refused, never sent twice. Older rows have
-- none and are never taken as a retry's.
ALTER TABLE orders ADD COLUMN attempt text;
