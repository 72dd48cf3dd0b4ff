-- Automatic refits of the model service that decided nothing, beside those decided
-- (model_refits): refused for what their rows or models are (too few rows, one class, a
-- score NaN, the serving model expired) or failed (an error, a dependency away), with the
-- reason (a word of a short fixed list, as counted in pumpflow_model_refits_total) and
-- the message. GET /refits lists both; the newest few of each model are kept, and the
-- newest says when its refit was last tried, on every replica.
CREATE TABLE model_refits_undecided (
    id bigserial PRIMARY KEY,
    model_id text NOT NULL,
    serving_version text NOT NULL,
    outcome text NOT NULL,
    reason text NOT NULL,
    detail text NOT NULL,
    -- the stored labels it was given (NULL: refused before they were read)
    rows integer,
    at double precision NOT NULL
);
CREATE INDEX model_refits_undecided_latest ON model_refits_undecided (model_id, id);
