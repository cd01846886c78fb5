"""The store contract for head names (issue 18): versions reserved per (tenant, name), aliases,
deletes that aliases protect, and heads stored before versions existed. Part of the store
contract suite (test_store_contract.py, whose fixtures run each test against LocalStore and
PostgresStore on a real PostgreSQL); kept apart only for the file's size."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sqlite3
import threading
import time
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from transfer_service.domain import HeadName, JobCompleted, JobState
from transfer_service.errors import FailedPreconditionError, NotFoundError
from transfer_service.store.codec import head_to_json
from transfer_service.store.interface import Store
from transfer_service.store.local import LocalStore
from transfer_service.store.pg_migrations import available_migrations
from transfer_service.store.postgres import PostgresStore

from tests.unit.test_store_contract import (
    METRICS,
    T0,
    WEIGHTS,
    Backend,
    event,
    head,
    job,
)


def saved(store: Store, head_id: str, *, name: str = "cats", tenant: str = "default") -> int:
    """Trains a head the way the job runner does: reserve, then save. Returns its version."""
    version = store.reserve_head_version(tenant, name)
    created = T0 + timedelta(seconds=version)
    store.save_head(
        head(head_id, name=name, tenant=tenant, created=created, version=version), WEIGHTS
    )
    return version


def test_versions_are_reserved_in_order_per_name_and_never_reused(store: Store) -> None:
    assert [store.reserve_head_version("default", "cats") for _ in range(3)] == [1, 2, 3]
    assert store.reserve_head_version("default", "dogs") == 1
    assert store.reserve_head_version("acme", "cats") == 1  # tenants number apart
    assert saved(store, "cats-4") == 4
    assert saved(store, "cats-5") == 5
    store.delete_head("cats-5")
    assert store.reserve_head_version("default", "cats") == 6  # 5 deleted, still not reused
    assert store.get_head("cats-4").version == 4
    assert [h.version for h in store.list_heads(name="cats")] == [4]


def test_concurrent_reservations_from_two_replicas_are_all_distinct(backend: Backend) -> None:
    """Two opened stores (for PostgreSQL two replicas with connections of their own), four
    threads each: every version handed out exactly once, none skipped."""
    replicas = [backend.open(), backend.open()]
    reserved: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def reserve(replica: Store) -> None:
        try:
            start.wait()
            for _ in range(25):
                reserved.append(replica.reserve_head_version("default", "cats"))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=reserve, args=(replicas[i % 2],)) for i in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        for replica in replicas:
            replica.close()
    assert errors == []
    assert sorted(reserved) == list(range(1, 201))


def test_head_name_reads_versions_and_aliases(store: Store) -> None:
    with pytest.raises(NotFoundError, match="no head named 'cats'"):
        store.head_name("default", "cats")
    saved(store, "cats-1")
    saved(store, "cats-2")
    saved(store, "cats-x", tenant="acme")
    assert store.head_name("default", "cats") == HeadName(
        "default", "cats", {1: "cats-1", 2: "cats-2"}, {}
    )
    assert store.head_name("acme", "cats").versions == {1: "cats-x"}
    after = store.set_head_alias("default", "cats", "production", 1)
    assert after == HeadName("default", "cats", {1: "cats-1", 2: "cats-2"}, {"production": 1})
    assert store.head_name("acme", "cats").aliases == {}  # another tenant's name
    store.delete_head("cats-2")
    store.delete_head("cats-1", force=True)
    with pytest.raises(NotFoundError, match="no head named 'cats'"):
        store.head_name("default", "cats")  # every version deleted


def test_aliases_are_set_moved_and_deleted(store: Store) -> None:
    for head_id in ("cats-1", "cats-2", "cats-3"):
        saved(store, head_id)
    store.set_head_alias("default", "cats", "production", 1)
    store.set_head_alias("default", "cats", "staging", 1)
    moved = store.set_head_alias("default", "cats", "production", 3)
    assert moved.aliases == {"production": 3, "staging": 1}
    assert moved.aliases_of(1) == ("staging",)
    after = store.delete_head_alias("default", "cats", "staging")
    assert after.aliases == {"production": 3}
    assert after.versions == {1: "cats-1", 2: "cats-2", 3: "cats-3"}  # versions untouched
    with pytest.raises(NotFoundError, match="head 'cats' has no alias 'staging'"):
        store.delete_head_alias("default", "cats", "staging")
    with pytest.raises(NotFoundError, match="head 'cats' has no version 7"):
        store.set_head_alias("default", "cats", "canary", 7)
    store.reserve_head_version("default", "cats")  # 4: reserved, never saved
    with pytest.raises(NotFoundError, match="has no version 4"):
        store.set_head_alias("default", "cats", "canary", 4)
    store.delete_head("cats-2")
    with pytest.raises(NotFoundError, match="has no version 2"):
        store.set_head_alias("default", "cats", "canary", 2)
    with pytest.raises(NotFoundError, match="no head named 'dogs'"):
        store.set_head_alias("default", "dogs", "production", 1)
    assert store.head_name("default", "cats").aliases == {"production": 3}


def test_a_version_aliases_point_at_is_deleted_only_with_force(store: Store) -> None:
    saved(store, "cats-1")
    saved(store, "cats-2")
    store.set_head_alias("default", "cats", "staging", 1)
    store.set_head_alias("default", "cats", "production", 1)
    store.set_head_alias("default", "cats", "canary", 2)
    with pytest.raises(FailedPreconditionError) as refused:
        store.delete_head("cats-1")
    assert refused.value.message == (
        "head cats-1 is version 1 of cats, which aliases production, staging point at; move "
        "or delete them first, or delete with force"
    )
    assert store.get_head("cats-1").version == 1  # nothing was deleted
    assert store.head_name("default", "cats").aliases == {
        "staging": 1,
        "production": 1,
        "canary": 2,
    }
    store.delete_head("cats-1", force=True)
    with pytest.raises(NotFoundError):
        store.get_head("cats-1")
    assert store.head_name("default", "cats") == HeadName(
        "default", "cats", {2: "cats-2"}, {"canary": 2}
    )
    with pytest.raises(NotFoundError):
        store.delete_head("cats-1", force=True)


def test_a_head_saved_without_a_version_gets_the_next_one(backend: Backend, store: Store) -> None:
    saved(store, "cats-1")
    store.save_head(head("cats-2", created=T0 + timedelta(seconds=9)), WEIGHTS)  # version 0
    assert store.get_head("cats-2").version == 2
    assert [h.version for h in store.list_heads()] == [1, 2]
    assert store.reserve_head_version("default", "cats") == 3


def test_a_version_is_saved_once(store: Store) -> None:
    saved(store, "cats-1")
    with pytest.raises(FailedPreconditionError, match="already has a version 1"):
        store.save_head(head("cats-again", version=1), WEIGHTS)
    with pytest.raises(NotFoundError):
        store.get_head("cats-again")
    # complete_job: neither the head nor the job's success commits.
    running = dataclasses.replace(job("job-1", state=JobState.RUNNING), last_sequence=1)
    store.save_job(running)
    done = dataclasses.replace(running, state=JobState.SUCCEEDED, head_id="h-2", last_sequence=2)
    completed = event("job-1", 2, JobCompleted("h-2", METRICS, head_version=1))
    with pytest.raises(FailedPreconditionError, match="already has a version 1"):
        store.complete_job(done, completed, head("h-2", version=1), WEIGHTS)
    assert store.get_job("job-1") == running
    assert store.events_after("job-1", 0) == []
    assert [h.head_id for h in store.list_heads()] == ["cats-1"]
    version = store.reserve_head_version("default", "cats")
    store.complete_job(done, completed, head("h-2", version=version), WEIGHTS)
    assert store.get_head("h-2").version == 2
    assert store.events_after("job-1", 1)[0].payload == completed.payload


def test_a_reopened_store_keeps_versions_aliases_and_next_version(backend: Backend) -> None:
    store = backend.open()
    saved(store, "cats-1")
    saved(store, "cats-2")
    store.reserve_head_version("default", "cats")  # 3: its job failed, never saved
    store.set_head_alias("default", "cats", "production", 2)
    store.close()
    reopened = backend.open()
    try:
        assert reopened.head_name("default", "cats") == HeadName(
            "default", "cats", {1: "cats-1", 2: "cats-2"}, {"production": 2}
        )
        assert reopened.get_head("cats-2").version == 2
        assert reopened.reserve_head_version("default", "cats") == 4
    finally:
        reopened.close()


# ---- heads stored before versions existed ----

# Created out of id order, two at one time (ties by id): versions follow created order.
_LEGACY = [
    ("cats-c", "cats", 0),
    ("cats-a", "cats", 2),
    ("cats-b", "cats", 2),
    ("dogs-a", "dogs", 1),
]
_LEGACY_VERSIONS = {"cats-c": 1, "cats-a": 2, "cats-b": 3, "dogs-a": 1}


def _legacy_records() -> list[tuple[str, str]]:
    """(head_id, JSON without a version key) of the legacy heads."""
    records = []
    for head_id, name, seconds in _LEGACY:
        record = head(head_id, name=name, created=T0 + timedelta(seconds=seconds))
        data = json.loads(head_to_json(record))
        del data["version"]
        records.append((head_id, json.dumps(data)))
    return records


def _check_legacy_numbering(store: Store) -> None:
    assert {h.head_id: h.version for h in store.list_heads()} == _LEGACY_VERSIONS
    assert store.head_name("default", "cats").versions == {1: "cats-c", 2: "cats-a", 3: "cats-b"}
    assert store.get_head("cats-b").version == 3
    assert store.reserve_head_version("default", "cats") == 4
    assert store.reserve_head_version("default", "dogs") == 2


def test_a_local_store_from_before_versions_numbers_its_heads(tmp_path: Path) -> None:
    root = tmp_path / "store"
    old = LocalStore(root)
    for head_id, name, seconds in _LEGACY:
        old.save_head(head(head_id, name=name, created=T0 + timedelta(seconds=seconds)), WEIGHTS)
    old.close()
    # Back to what code before versions wrote: head.json without a version, schema 3.
    for head_id, text in _legacy_records():
        (root / "heads" / head_id / "head.json").write_text(text)
    with contextlib.closing(sqlite3.connect(root / "store.sqlite3")) as db:
        db.executescript(
            "DROP INDEX heads_by_version; ALTER TABLE heads DROP COLUMN version; "
            "DROP TABLE head_names; DROP TABLE head_aliases; PRAGMA user_version = 3;"
        )
    upgraded = LocalStore(root)
    try:
        _check_legacy_numbering(upgraded)
    finally:
        upgraded.close()
    for head_id, version in _LEGACY_VERSIONS.items():  # written into the files themselves
        assert json.loads((root / "heads" / head_id / "head.json").read_text())["version"] == (
            version
        )
    again = LocalStore(root)  # nothing left to number; next_version kept
    try:
        assert again.get_head("cats-b").version == 3
        assert again.reserve_head_version("default", "cats") == 5
    finally:
        again.close()


def test_a_local_store_drops_aliases_of_a_head_whose_delete_was_cut_off(tmp_path: Path) -> None:
    """A kill after a delete's files went but before its row did: the next start drops the
    row and the aliases at its version with it."""
    store = LocalStore(tmp_path)
    saved(store, "cats-1")
    saved(store, "cats-2")
    store.set_head_alias("default", "cats", "production", 1)
    store.set_head_alias("default", "cats", "staging", 2)
    store.close()
    shutil.rmtree(tmp_path / "heads" / "cats-1")
    reopened = LocalStore(tmp_path)
    try:
        assert reopened.head_name("default", "cats") == HeadName(
            "default", "cats", {2: "cats-2"}, {"staging": 2}
        )
    finally:
        reopened.close()


def test_a_postgres_database_from_before_versions_numbers_its_heads(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in available_migrations()[:3]:
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
        for (head_id, text), (_, name, seconds) in zip(_legacy_records(), _LEGACY, strict=True):
            conn.execute(
                "INSERT INTO heads (head_id, tenant, name, backbone, job_id, created, record, "
                "weights, weights_sha256) VALUES (%s, 'default', %s, 'efficientnet_lite0', "
                "'job', %s, %s, %s, '')",
                (head_id, name, T0 + timedelta(seconds=seconds), text, b"not read here"),
            )
    store = PostgresStore(database_url)
    try:
        _check_legacy_numbering(store)
        # An older replica (no version column in its INSERT) during a rolling upgrade: its
        # head still gets the name's next version.
        with psycopg.connect(database_url) as conn:
            conn.execute(
                "INSERT INTO heads (head_id, tenant, name, backbone, job_id, created, record, "
                "weights, weights_sha256) SELECT 'cats-old', tenant, name, backbone, job_id, "
                "created, record, weights, weights_sha256 FROM heads WHERE head_id = 'cats-a'"
            )
            row = conn.execute("SELECT version FROM heads WHERE head_id = 'cats-old'").fetchone()
            assert row == (5,)
        # The database itself keeps an alias from outliving its version.
        store.set_head_alias("default", "cats", "production", 2)
        with (
            psycopg.connect(database_url) as conn,
            pytest.raises(psycopg.errors.ForeignKeyViolation),
        ):
            conn.execute("DELETE FROM heads WHERE head_id = 'cats-a'")
    finally:
        store.close()


def test_a_local_store_whose_database_was_recreated_keeps_the_versions(tmp_path: Path) -> None:
    """The head files are the truth: a database recreated beside them (TRANSFER_RECREATE_
    DATABASE) gets each head's version back, and next_version continues after them."""
    store = LocalStore(tmp_path)
    saved(store, "cats-1")
    saved(store, "cats-2")
    store.close()
    (tmp_path / "store.sqlite3").unlink()
    recreated = LocalStore(tmp_path, recreate_database=True)
    try:
        assert recreated.head_name("default", "cats").versions == {1: "cats-1", 2: "cats-2"}
        assert recreated.reserve_head_version("default", "cats") == 3
    finally:
        recreated.close()


def test_a_postgres_delete_waits_for_an_alias_being_set_and_then_sees_it(
    database_url: str,
) -> None:
    """An alias write in flight holds its name's row: a delete of that version waits for it,
    then finds the alias and refuses (not a delete that leaves the alias dangling)."""
    store = PostgresStore(database_url)
    try:
        saved(store, "cats-1")
        outcome: list[BaseException | None] = []
        with psycopg.connect(database_url) as writer:
            # What set_head_alias does, held open: the name's row locked, the alias written.
            writer.execute(
                "SELECT 1 FROM head_names WHERE tenant = 'default' AND name = 'cats' FOR UPDATE"
            )
            writer.execute(
                "INSERT INTO head_aliases (tenant, name, alias, version) "
                "VALUES ('default', 'cats', 'production', 1)"
            )

            def delete() -> None:
                try:
                    store.delete_head("cats-1")
                    outcome.append(None)
                except BaseException as exc:  # surfaced below
                    outcome.append(exc)

            deleter = threading.Thread(target=delete)
            deleter.start()
            with psycopg.connect(database_url, autocommit=True) as watcher:
                for _ in range(600):
                    waiting = watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND datname = current_database()"
                    ).fetchone()
                    if waiting is not None and waiting[0] >= 1:
                        break
                    time.sleep(0.05)
                else:
                    pytest.fail("the delete never waited on the name's lock")
            writer.commit()
        deleter.join(timeout=30)
        assert len(outcome) == 1 and isinstance(outcome[0], FailedPreconditionError)
        assert store.head_name("default", "cats").aliases == {"production": 1}
    finally:
        store.close()
