-- CancelJob from any replica: the request is recorded on the job's row, and the replica
-- holding the job's lease reads it back at its next renewal and stops the job.
ALTER TABLE jobs ADD COLUMN cancel_requested boolean NOT NULL DEFAULT false;
