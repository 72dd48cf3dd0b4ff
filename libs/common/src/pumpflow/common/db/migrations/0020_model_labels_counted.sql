-- The model service's refit check counts a model's labels (all, and those after its last
-- refit's) every 30 s on every replica: a range of this index, read up to the count the
-- refit policy needs without visiting the table, however many labels are stored.
CREATE INDEX model_labels_counted ON model_labels (model_id, feature_set_version, definition, id);
