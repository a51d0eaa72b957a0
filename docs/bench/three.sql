\set d random(1, 500)
WITH l AS (SELECT id FROM pgb.ds WHERE id = :d FOR UPDATE), u AS (UPDATE pgb.ds SET sync_count = sync_count + 1 WHERE id = (SELECT id FROM l) RETURNING id) INSERT INTO pgb.rec SELECT id, 'lt0', 'v', 1 FROM u ON CONFLICT (ds, key) DO UPDATE SET value = EXCLUDED.value, sync_count = EXCLUDED.sync_count;
