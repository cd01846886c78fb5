"""The store contract for measurements (issue 20: the measured precision kept per machine):
absent keys read None, the last write wins, and values outlive a reopen. Runs against
LocalStore and PostgresStore on a real PostgreSQL, as the contract suite does."""

from __future__ import annotations

from transfer_service.store.interface import Store

from tests.unit.test_store_contract import Backend

KEY = "precision/v1/efficientnet_lite0/input224/cpu/0123456789abcdef/float32,bfloat16"


def test_a_measurement_is_absent_then_written_then_replaced(store: Store) -> None:
    assert store.read_measurement(KEY) is None
    store.write_measurement(KEY, '{"precision": "float32"}')
    assert store.read_measurement(KEY) == '{"precision": "float32"}'
    store.write_measurement(KEY, '{"precision": "bfloat16"}')
    assert store.read_measurement(KEY) == '{"precision": "bfloat16"}'
    assert store.read_measurement(KEY.replace("cpu", "cuda")) is None


def test_a_measurement_outlives_a_reopen(backend: Backend) -> None:
    first = backend.open()
    first.write_measurement(KEY, "value")
    first.close()
    again = backend.open()
    try:
        assert again.read_measurement(KEY) == "value"
    finally:
        again.close()
