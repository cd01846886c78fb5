-- Head names with versions and aliases (issue 18; HeadStore.reserve_head_version, head_name,
-- set_head_alias, delete_head_alias). The `version` column is a head's version; the record's
-- JSON carries it too, but the column is what the store reads back.

-- Each name's next version: reserved with one INSERT ... ON CONFLICT DO UPDATE, so atomic
-- across replicas; never lowered, so a version is never handed out twice. Set-alias and
-- delete lock the name's row (FOR UPDATE) to serialise per (tenant, name).
CREATE TABLE head_names (
  tenant text NOT NULL,
  name text NOT NULL,
  next_version integer NOT NULL CHECK (next_version > 0),
  PRIMARY KEY (tenant, name)
);

-- Heads stored before versions: numbered 1, 2, ... per (tenant, name) in created order, ties
-- by head id; their names' next_version continues after them.
ALTER TABLE heads ADD COLUMN version integer NOT NULL DEFAULT 0;
UPDATE heads SET version = numbered.version
FROM (
  SELECT head_id,
         row_number() OVER (PARTITION BY tenant, name ORDER BY created, head_id) AS version
  FROM heads
) AS numbered
WHERE heads.head_id = numbered.head_id;
INSERT INTO head_names (tenant, name, next_version)
SELECT tenant, name, max(version) + 1 FROM heads GROUP BY tenant, name;
CREATE UNIQUE INDEX heads_by_version ON heads (tenant, name, version);

-- A head inserted without a version (0: code older than this migration, during a rolling
-- upgrade, or a record saved without reserving) gets its name's next one; one inserted with
-- a version moves its name's next_version past it.
CREATE FUNCTION heads_version() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
  IF NEW.version IS NULL OR NEW.version <= 0 THEN
    INSERT INTO head_names AS n (tenant, name, next_version) VALUES (NEW.tenant, NEW.name, 2)
    ON CONFLICT (tenant, name) DO UPDATE SET next_version = n.next_version + 1
    RETURNING n.next_version - 1 INTO NEW.version;
  ELSE
    INSERT INTO head_names AS n (tenant, name, next_version)
    VALUES (NEW.tenant, NEW.name, NEW.version + 1)
    ON CONFLICT (tenant, name) DO UPDATE
    SET next_version = greatest(n.next_version, excluded.next_version);
  END IF;
  RETURN NEW;
END
$body$;
CREATE TRIGGER heads_version BEFORE INSERT ON heads
  FOR EACH ROW EXECUTE FUNCTION heads_version();

-- alias -> version of a name. The foreign key keeps an alias from outliving its version even
-- for a delete that skipped the store's check (NO ACTION: such a delete fails).
CREATE TABLE head_aliases (
  tenant text NOT NULL,
  name text NOT NULL,
  alias text NOT NULL,
  version integer NOT NULL,
  PRIMARY KEY (tenant, name, alias),
  FOREIGN KEY (tenant, name, version) REFERENCES heads (tenant, name, version)
);
CREATE INDEX head_aliases_by_version ON head_aliases (tenant, name, version);
