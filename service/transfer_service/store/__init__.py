"""Durable state: heads (safetensors + JSON), jobs and their events, uploaded datasets.

interface.py      the Store protocols the rest of the server uses; ids.py: the ids it accepts
local.py          LocalStore, the embedded store (one process), composed of:
  head_files.py   the head store: heads as files on disk, checksummed, saved atomically
  sqlite_head_index.py  which heads exist, by tenant, name, backbone (ListHeads pages)
  sqlite_jobs.py  jobs and job events in SQLite
  sqlite_datasets.py  uploaded datasets and their writer in SQLite
  sqlite_schema.py    the SQLite tables: open, migrate, transactions
  disk_faults.py  a full or read-only disk as RESOURCE_EXHAUSTED (or a refused start)
postgres.py       PostgresStore, shared by replicas (TRANSFER_DATABASE_URL): heads (record and
                  weights bytes), composed of:
  pg_jobs.py      jobs and job events
  pg_datasets.py  uploaded datasets and their writer
  pg_pool.py      the connection pool; database errors as UNAVAILABLE / RESOURCE_EXHAUSTED
  pg_migrations.py  migrations/NNNN_*.sql, applied once under an advisory lock
codec.py          head.json and job event payloads to and from JSON; stored weights, checked
delegation.py     the job and dataset methods both stores hand to their parts
paged_query.py    the filtered, keyset-paged SELECT of ListJobs and ListHeads, per database
"""
