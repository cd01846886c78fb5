-- The PostgreSQL store's first schema (transfer_service.store.postgres). Applied once, by
-- pg_migrations, inside the transaction that holds the migration lock.
-- Ids sort as Python sorts strings (byte order): COLLATE "C". Times are timestamptz.
-- JSON is kept as text: it may hold NaN (a diverged loss), which json/jsonb refuse.

-- Heads: the record (codec.head_to_json, no checksum in it) and the safetensors bytes, with
-- the bytes' SHA-256, checked on every load. tenant/name/backbone/created are copies of the
-- record's fields for filtering and paging; `tenant` also names the owner of a head whose
-- record is damaged.
CREATE TABLE heads (
  head_id text COLLATE "C" PRIMARY KEY,
  tenant text NOT NULL,
  name text NOT NULL,
  backbone text NOT NULL,
  job_id text COLLATE "C" NOT NULL,
  created timestamptz NOT NULL,
  record text NOT NULL,
  weights bytea NOT NULL,
  weights_sha256 text NOT NULL
);
CREATE INDEX heads_by_created ON heads (created, head_id);
CREATE INDEX heads_by_tenant ON heads (tenant, created, head_id);

-- Jobs. The lease columns are for jobs claimed from this table as a queue (a replica owns a
-- running job while its lease is current); NULL while nobody holds one.
CREATE TABLE jobs (
  job_id text COLLATE "C" PRIMARY KEY,
  tenant text NOT NULL,
  state text NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
  backbone text NOT NULL,
  head_name text NOT NULL,
  head_id text COLLATE "C" NOT NULL,
  error text NOT NULL,
  created timestamptz NOT NULL,
  updated timestamptz NOT NULL,
  last_sequence bigint NOT NULL,
  progress text,
  lease_owner text,
  lease_expires timestamptz,
  attempts integer NOT NULL DEFAULT 0
);
CREATE INDEX jobs_by_created ON jobs (created, job_id);
CREATE INDEX jobs_by_tenant ON jobs (tenant, created, job_id);
CREATE INDEX jobs_unfinished ON jobs (created, job_id) WHERE state IN ('queued', 'running');
CREATE INDEX jobs_finished_by_updated ON jobs (updated)
  WHERE state IN ('succeeded', 'failed', 'cancelled');

-- A job's event log: one row per event, replayed by sequence. No foreign key: an event may
-- be written before its job's row (and retention deletes both).
CREATE TABLE job_events (
  job_id text COLLATE "C" NOT NULL,
  sequence bigint NOT NULL,
  time timestamptz NOT NULL,
  kind text NOT NULL,
  payload text NOT NULL,
  PRIMARY KEY (job_id, sequence)
);

-- Uploaded datasets. An upload's rows exist from its first chunk with complete = false
-- (invisible, but counted against the tenant's quota); commit sets it. `touched` is its last
-- chunk's time: incomplete uploads left untouched for long (a replica died mid-upload) are
-- removed at start-up.
CREATE TABLE datasets (
  dataset_id text COLLATE "C" PRIMARY KEY,
  tenant text NOT NULL,
  complete boolean NOT NULL,
  modality text NOT NULL,
  example_count integer NOT NULL,
  class_counts text NOT NULL,
  created timestamptz NOT NULL,
  touched timestamptz NOT NULL,
  bytes bigint NOT NULL DEFAULT 0
);
CREATE INDEX datasets_by_tenant ON datasets (tenant);
CREATE INDEX datasets_incomplete ON datasets (touched) WHERE NOT complete;

-- Labels and texts as UTF-8 bytes: PostgreSQL text cannot hold a NUL character, which an
-- uploaded label or text may.
CREATE TABLE dataset_examples (
  dataset_id text COLLATE "C" NOT NULL REFERENCES datasets ON DELETE CASCADE,
  idx integer NOT NULL,
  label bytea NOT NULL,
  image bytea,
  text bytea,
  PRIMARY KEY (dataset_id, idx)
);
