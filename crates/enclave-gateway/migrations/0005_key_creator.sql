-- Who created each key (`key:<id>` of the creating key, `cli:<user>`, `token:<sub>`), so a
-- key's lineage can be traced; '' for keys made before this was recorded.
ALTER TABLE api_keys ADD COLUMN created_by TEXT NOT NULL DEFAULT '';
