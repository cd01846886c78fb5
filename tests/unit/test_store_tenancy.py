"""Tenants in the store: recorded on heads, jobs and datasets, and data written before
tenancy (schema version 0, head files without a tenant) read as the default tenant."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from transfer_service.domain import (
    DEFAULT_TENANT,
    JobRecord,
    JobState,
    LabeledExample,
    ModelInput,
)
from transfer_service.store.local import LocalStore

from tests.unit.test_store import WEIGHTS, record

# What the store created before tenants existed (PRAGMA user_version 0).
SCHEMA_V0 = """
CREATE TABLE jobs (
  job_id TEXT PRIMARY KEY, state TEXT NOT NULL, backbone TEXT NOT NULL, head_name TEXT NOT NULL,
  head_id TEXT NOT NULL, error TEXT NOT NULL, created TEXT NOT NULL, updated TEXT NOT NULL,
  last_sequence INTEGER NOT NULL, progress TEXT NOT NULL);
CREATE TABLE job_events (
  job_id TEXT NOT NULL, sequence INTEGER NOT NULL, time TEXT NOT NULL, kind TEXT NOT NULL,
  payload TEXT NOT NULL, PRIMARY KEY (job_id, sequence));
CREATE TABLE datasets (
  dataset_id TEXT PRIMARY KEY, complete INTEGER NOT NULL, modality TEXT NOT NULL,
  example_count INTEGER NOT NULL, class_counts TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE dataset_examples (
  dataset_id TEXT NOT NULL, idx INTEGER NOT NULL, label TEXT NOT NULL, image BLOB, text TEXT,
  PRIMARY KEY (dataset_id, idx));
"""


def write_version_0_store(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC).isoformat()
    db = sqlite3.connect(root / "store.sqlite3")
    db.executescript(SCHEMA_V0)
    db.execute(
        "INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?)",
        ("job-old", "succeeded", "minilm_l6", "news", "news-1234", "", now, now, 3, ""),
    )
    db.execute("INSERT INTO datasets VALUES ('ds-old', 1, 'text', 1, '[[\"a\", 1]]', ?)", (now,))
    db.execute("INSERT INTO dataset_examples VALUES ('ds-old', 0, 'a', NULL, 'hello')")
    db.commit()
    db.close()


def test_a_version_0_database_is_migrated_once(tmp_path: Path) -> None:
    write_version_0_store(tmp_path)
    store = LocalStore(tmp_path)
    old_job = store.get_job("job-old")
    assert old_job.tenant == DEFAULT_TENANT and old_job.head_id == "news-1234"
    info = store.dataset_info("ds-old")
    examples = store.dataset_examples(info)
    assert info.tenant == DEFAULT_TENANT and examples[0].input.text == "hello"
    now = datetime.now(UTC)
    store.save_job(JobRecord("job-new", JobState.QUEUED, "minilm_l6", "x", now, now, tenant="bob"))
    store.close()

    reopened = LocalStore(tmp_path)  # already at the current version: nothing to do
    assert {job.job_id: job.tenant for job in reopened.list_jobs()} == {
        "job-old": DEFAULT_TENANT,
        "job-new": "bob",
    }
    reopened.close()
    db = sqlite3.connect(tmp_path / "store.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 4
    db.close()


def test_tenants_round_trip(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.save_head(replace(record("cats-aaaa"), tenant="alice"), WEIGHTS)
    assert store.get_head("cats-aaaa").tenant == "alice"
    writer = store.begin_dataset("alice")
    writer.add([LabeledExample(ModelInput(text="hi"), "a")])
    info = writer.commit()
    assert info.tenant == "alice"
    assert store.dataset_info(info.dataset_id).tenant == "alice"
    store.close()


def test_a_head_file_without_a_tenant_belongs_to_the_default_tenant(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.save_head(record("cats-bbbb"), WEIGHTS)
    meta = tmp_path / "heads" / "cats-bbbb" / "head.json"
    data = json.loads(meta.read_text())
    del data["tenant"]  # as written before tenancy
    meta.write_text(json.dumps(data))
    assert store.get_head("cats-bbbb").tenant == DEFAULT_TENANT
    store.close()
