-- The job queue (transfer_service.store.pg_job_queue): a job's row carries what a replica
-- claiming it needs to run it, and what makes a retried FineTune find its job again.
-- `spec`: the job's spec without its examples (codec.spec_to_json; NULL on rows older code
-- wrote, which cannot be run again). `request_key`/`request_digest`: the caller's request id
-- and a digest of its request ('' for none); a tenant's key names one job.
-- Rows written before this migration keep lease_owner/lease_expires/attempts as they were.
ALTER TABLE jobs ADD COLUMN spec text;
ALTER TABLE jobs ADD COLUMN request_key text NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN request_digest text NOT NULL DEFAULT '';
CREATE UNIQUE INDEX jobs_by_request_key ON jobs (tenant, request_key) WHERE request_key <> '';

-- A queued job's examples until it ends (then deleted with its final row). Labels and texts
-- as UTF-8 bytes, as in dataset_examples: text cannot hold a NUL. No foreign key, as for
-- job_events: the store deletes them itself.
CREATE TABLE job_examples (
  job_id text COLLATE "C" NOT NULL,
  split text NOT NULL CHECK (split IN ('train', 'validation')),
  idx integer NOT NULL,
  label bytea NOT NULL,
  image bytea,
  text bytea,
  PRIMARY KEY (job_id, split, idx)
);
