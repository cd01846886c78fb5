"""Durable state: heads (safetensors + JSON), jobs and their events, uploaded datasets.

interface.py      the Store protocols the rest of the server uses; ids.py: the ids it accepts
local.py          LocalStore, the embedded store, composed of:
  head_files.py   the head store: heads as files on disk, checksummed, saved atomically
  sqlite_jobs.py  jobs and job events in SQLite
  sqlite_datasets.py  uploaded datasets and their writer in SQLite
  sqlite_schema.py    the SQLite tables: open, migrate, transactions
  disk_faults.py  a full or read-only disk as RESOURCE_EXHAUSTED (or a refused start)
codec.py          head.json and job event payloads to and from JSON
"""
