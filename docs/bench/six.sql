\set d random(1, 500)
BEGIN;
SELECT id, sync_count FROM pgb.ds WHERE id = :d FOR UPDATE;
SELECT key, value FROM pgb.rec WHERE ds = :d AND (value IS NOT NULL OR key = ANY(ARRAY['lt0']));
UPDATE pgb.ds SET sync_count = sync_count + 1 WHERE id = :d;
INSERT INTO pgb.rec VALUES (:d, 'lt0', 'v', 1) ON CONFLICT (ds, key) DO UPDATE SET value = EXCLUDED.value, sync_count = EXCLUDED.sync_count;
COMMIT;
