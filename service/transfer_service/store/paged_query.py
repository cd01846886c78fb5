"""One page of a filtered listing as SQL, for each database the stores use: equality filters
on the columns given (None: no filter), keyset paging past a (created time, id) position,
oldest first with ties by id, at most `limit` rows. ListJobs and ListHeads read through it on
both stores; `filled_page` keeps a ListHeads page full past damaged heads."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from psycopg import sql

Filters = Sequence[tuple[str, object]]


def sqlite_page(
    select: str,
    id_column: str,
    filters: Filters,
    after: tuple[datetime, str] | None,
    limit: int | None,
) -> tuple[str, list[object]]:
    """`select` ("SELECT ... FROM table") with the page's WHERE, ORDER BY and LIMIT, and its
    parameters. `created` is stored as isoformat text, which sorts as the times do."""
    where: list[str] = []
    parameters: list[object] = []
    for column, value in filters:
        if value is not None:
            where.append(f"{column} = ?")
            parameters.append(value)
    if after is not None:
        created = after[0].isoformat()  # as the rows were stored
        where.append(f"(created > ? OR (created = ? AND {id_column} > ?))")
        parameters += [created, created, after[1]]
    query = select
    if where:
        query += " WHERE " + " AND ".join(where)
    query += f" ORDER BY created, {id_column}"
    if limit is not None:
        query += " LIMIT ?"
        parameters.append(limit)
    return query, parameters


def postgres_page(
    select: str,
    id_column: str,
    filters: Filters,
    after: tuple[datetime, str] | None,
    limit: int | None,
) -> tuple[sql.Composed, list[Any]]:
    """The same for PostgreSQL (`created` is timestamptz; a naive time is taken as UTC)."""
    where: list[sql.Composable] = []
    parameters: list[Any] = []
    for column, value in filters:
        if value is not None:
            where.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            parameters.append(value)
    if after is not None:
        created = after[0] if after[0].tzinfo is not None else after[0].replace(tzinfo=UTC)
        where.append(sql.SQL("(created, {}) > (%s, %s)").format(sql.Identifier(id_column)))
        parameters += [created, after[1]]
    query = sql.Composed([sql.SQL(select)])  # type: ignore[arg-type]  # the caller's constant
    if where:
        query += sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where)
    query += sql.SQL(" ORDER BY created, {}").format(sql.Identifier(id_column))
    if limit is not None:
        query += sql.SQL(" LIMIT %s")
        parameters.append(limit)
    return query, parameters


RecordT = TypeVar("RecordT")


def filled_page(
    read: Callable[
        [tuple[datetime, str] | None, int | None],
        tuple[list[RecordT], list[tuple[datetime, str]]],
    ],
    after: tuple[datetime, str] | None,
    limit: int | None,
) -> list[RecordT]:
    """A page of up to `limit` records past `after`. `read(after, limit)` reads up to
    `limit` rows past `after` and returns the records it keeps and every row's position;
    a row it leaves out (a damaged head) is replaced from the rows after it, so a page short
    of `limit` always means the listing's end (ListHeads reads limit + 1 to tell)."""
    records: list[RecordT] = []
    while True:
        wanted = None if limit is None else limit - len(records)
        kept, positions = read(after, wanted)
        records += kept
        if wanted is None or len(positions) < wanted or len(records) == limit:
            return records
        after = positions[-1]
