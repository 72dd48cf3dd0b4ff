-- Live labels of the model service: each prediction followed to its label (the vector
-- it scored in the feature set's order, the score, the label), for rolling figures
-- that outlive a restart and for refitting on recent labelled rows.
CREATE TABLE model_labels (
    id bigserial PRIMARY KEY,
    model_id text NOT NULL,
    model_version text NOT NULL,
    arm text NOT NULL,
    mint text NOT NULL,
    -- event time of the scored vector (epoch seconds)
    event_time double precision NOT NULL,
    score double precision NOT NULL,
    label double precision NOT NULL,
    -- the card's label definition (JSON): rows of another definition are not refit on
    definition text NOT NULL,
    feature_set_version text NOT NULL,
    features double precision[] NOT NULL,
    resolved_at double precision NOT NULL,
    UNIQUE (model_id, arm, mint, event_time)
);
CREATE INDEX model_labels_recent ON model_labels (model_id, feature_set_version, event_time);

-- Every automatic refit decided, swapped or not: which version served, which was
-- fitted, their scores on the held-out slice, and the newest label it saw.
CREATE TABLE model_refits (
    id bigserial PRIMARY KEY,
    model_id text NOT NULL,
    serving_version text NOT NULL,
    candidate_version text NOT NULL,
    swapped boolean NOT NULL,
    metric text NOT NULL,
    serving_score double precision NOT NULL,
    candidate_score double precision NOT NULL,
    held_out_rows integer NOT NULL,
    rows integer NOT NULL,
    last_label_id bigint NOT NULL,
    at double precision NOT NULL,
    -- where the swapped-in model was written (NULL: not swapped)
    path text
);
CREATE INDEX model_refits_latest ON model_refits (model_id, id);
