-- The model a swapped-in refit made (its ONNX bytes and its card as the registry writes
-- it), stored with the refit: a replica on another machine, or one restarted on an empty
-- disk, writes it into its own registry from here, found by the model's content hash.
ALTER TABLE model_refits
    ADD COLUMN sha256 text,
    ADD COLUMN model bytea,
    ADD COLUMN card bytea;
CREATE INDEX model_refits_sha256 ON model_refits (sha256) WHERE sha256 IS NOT NULL;
