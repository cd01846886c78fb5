-- What a server measured about the machine it runs on (issue 20): the precision
-- TRANSFER_PRECISION=auto chose per backbone, keyed by backbone, input size and the machine's
-- fingerprint (backbones/measured_precision.py), so a restart does not measure again.
-- `value` is JSON; the last write wins (replicas on identical machines write the same kind).
CREATE TABLE measurements (
  key text COLLATE "C" PRIMARY KEY,
  value text NOT NULL,
  updated timestamptz NOT NULL DEFAULT now()
);
