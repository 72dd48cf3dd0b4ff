-- Leases held in Postgres beside the state store's (pumpflow.common.db.leases): a
-- single-writer role (the feed's PumpPortal connection) then outlives an outage of
-- either store. Expiry is judged by this server's clock only.
CREATE TABLE leases (
    name        text PRIMARY KEY,
    holder      text NOT NULL,
    expires_at  timestamptz NOT NULL
);
