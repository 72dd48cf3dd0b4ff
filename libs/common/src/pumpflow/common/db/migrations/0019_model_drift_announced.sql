-- The features of each model the deployment announced drifting (the model service's
-- announced.py): a row inserted by the replica announcing a drift, deleted by the one
-- announcing its recovery. In Postgres, not in the state store: a store that came back
-- empty would forget a drift announced whose recovery is still to be announced. A row
-- older than the service's TTL (30 days: a model taken out of service) counts as none.
CREATE TABLE model_drift_announced (
    model_id      text NOT NULL,
    feature       text NOT NULL,
    announced_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, feature)
);
