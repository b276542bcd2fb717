-- The weights of fairness keys (pool.configured v3): `key=weight` per weighted key,
-- sorted; null when the setting weighs every key 1.
ALTER TABLE pool_settings ADD COLUMN IF NOT EXISTS weights text[];
