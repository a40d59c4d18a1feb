"""A turn's writes in as few statements as the database allows, instead of the ORM's unit of work.

The stages add and change ORM rows without flushing (bot/conversations/store.py); at the end of
the turn `write_turn` writes them, then tells the session they are stored, so the commit's flush
finds nothing left to do. The unit of work cost about a fifth of a turn's CPU in bookkeeping
around the same statements, and what was left cost per statement (SQLAlchemy's execution path
and psycopg's; bench/THROUGHPUT.md, "The worker's hot path" and "The turn in one statement").

- On PostgreSQL: **one statement**, a data-modifying CTE (every UPDATE and INSERT in a `WITH`,
  the events' INSERT last, returning their keys). Its SQL is made once per shape of turn (which
  tables, columns and how many rows) and sent to the driver as it is: no SQLAlchemy compilation
  per turn, and the same text each time, which psycopg prepares on the server after a few uses.
- On SQLite (no data-modifying CTEs): pre-built Core statements, one INSERT per table and column
  set (all its rows at once) and one UPDATE per changed row.

Both write the same rows, field for field: the columns' Python defaults are applied as Core
applies them, and the events are one INSERT in the order they were emitted, so their keys follow
that order (docs/ARCHITECTURE.md, invariant 12). A session holding anything else (a consent
ledger row, say) is left to the ORM's flush whole, as before.
"""
from __future__ import annotations

import functools
import itertools
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import make_transient_to_detached

from bot.clock import utcnow
from bot.extensions import db
from bot.models import Contact, Conversation, Event, Message

#: What a turn adds, in the order the rows are written (a reply names its conversation).
ADDED = (Conversation, Message, Event)
#: What a turn changes.
CHANGED = frozenset({Contact, Conversation, Message})


@functools.cache
def _columns(model: type) -> tuple[tuple[str, str], ...]:
    """(attribute, column key) of each of the model's columns."""
    return tuple((prop.key, prop.columns[0].key) for prop in sa.inspect(model).column_attrs)


@functools.cache
def _insert(model: type) -> sa.Insert:
    """INSERT of the model's rows, executed with the columns each group of rows gives (the rest
    take their defaults); an event's key is the database's, returned in the rows' order."""
    table = model.__table__
    statement = sa.insert(table)
    if model is Event:
        statement = statement.returning(table.c.seq, sort_by_parameter_order=True)
    return statement


@functools.cache
def _update(model: type, keys: tuple[str, ...]) -> sa.Update:
    """UPDATE of these columns of one row, by its key (parameters `pk` and `v_<column>`)."""
    table = model.__table__
    [key_column] = table.primary_key.columns
    return (sa.update(table).where(key_column == sa.bindparam("pk"))
            .values({key: sa.bindparam(f"v_{key}", type_=table.c[key].type) for key in keys}))


def write_turn() -> None:
    """Write what the turn added and changed in the session, and mark it stored. Does not
    commit: the caller's commit is the turn's (and enqueues its deferred work, outbox.py).

    On PostgreSQL all of it is one statement (a data-modifying CTE, `_write_in_one_statement`);
    SQLite has no data-modifying CTEs, so there it is one statement per table (and per changed
    row), in the order the rows were added."""
    session = db.session()
    added = list(session.new)
    changed = list(session.dirty)
    if not added and not changed:
        return
    if any(type(row) not in ADDED for row in added) or any(type(row) not in CHANGED for row in changed):
        return  # the commit's flush writes all of it, as it always could
    connection = session.connection()
    now = utcnow()
    added.sort(key=lambda row: sa.inspect(row).insert_order)  # events keep the order they were emitted
    if one_statement(connection.dialect):
        _write_in_one_statement(connection, added, changed, now)
    else:
        _write_per_table(connection, added, changed, now)
    _mark_stored(session, added, changed)


def _mark_stored(session: sa.orm.Session, added: list[Any], changed: list[Any]) -> None:
    """Tell the session the rows are stored: persistent and clean, as after a flush, so the
    commit's flush finds nothing to do, the outbox sees the new rows as committed with the
    transaction, and the commit expires them like every other row (a rollback drops the new
    ones, as after a flush). This is the flush's own last step (`Session._register_persistent`),
    one call for the turn's rows; expunging, re-keying and adding each row cost more than the
    statement (bench/THROUGHPUT.md, "The turn in one statement"). Values the database filled in
    (an event's txid) are not in the rows until the commit expires them: nothing reads them
    in between. Should SQLAlchemy drop that method, the public way below does the same."""
    register = getattr(session, "_register_persistent", None)
    if register is not None:
        register({sa.inspect(row) for row in itertools.chain(added, changed)})
        return
    for row in changed:
        session.expire(row)
    for row in added:
        session.expunge(row)
        make_transient_to_detached(row)
        session.add(row)


def one_statement(dialect: sa.Dialect) -> bool:
    """Whether this database takes the turn's writes in one statement: PostgreSQL does (with a
    driver taking `%s` parameters, as psycopg does); SQLite has no data-modifying CTEs."""
    return dialect.name == "postgresql" and dialect.paramstyle in ("format", "pyformat")


def _write_per_table(connection: sa.Connection, added: list[Any], changed: list[Any], now: datetime) -> None:
    """One UPDATE per changed row, then one INSERT per table and column set (SQLite's way)."""
    for row in changed:
        _update_row(connection, row, now)
    for model in ADDED:
        rows = [(row, {column: row.__dict__[attr] for attr, column in _columns(model) if attr in row.__dict__})
                for row in added if type(row) is model]
        # Rows with the same columns, one after another, go in one statement; the order is kept.
        for _, group in itertools.groupby(rows, key=lambda member: tuple(member[1])):
            members = list(group)
            result = connection.execute(_insert(model), [values for _, values in members])
            if model is Event:
                for (row, _), seq in zip(members, result.scalars().all(), strict=True):
                    row.seq = seq


def _changed_values(row: Any, now: Any) -> tuple[dict[str, Any], Any]:
    """The columns the flow changed on a stored row (none: an empty dict), with `updated_at` as
    the column's onupdate would set it, and the row's primary key."""
    state = sa.inspect(row)
    values = {column: state.dict[attr] for attr, column in _columns(type(row))
              if attr in state.committed_state and attr in state.dict}
    if values:
        values.setdefault("updated_at", now)
    return values, state.identity[0]


def _update_row(connection: sa.Connection, row: Any, now: Any) -> None:
    values, pk = _changed_values(row, now)
    if not values:
        return
    params = {f"v_{key}": value for key, value in values.items()}
    params["pk"] = pk
    connection.execute(_update(type(row), tuple(values)), params)


# --- PostgreSQL: the turn in one statement ------------------------------------------------------

#: How a value of a new row is written: a parameter (given, or the column's Python default,
#: computed here as Core computes it), the column's SQL default expression, or DEFAULT.
_PARAM, _EXPRESSION, _DEFAULT = "p", "x", "d"


def _write_in_one_statement(connection: sa.Connection, added: list[Any], changed: list[Any], now: datetime) -> None:
    """Every write of the turn in one data-modifying CTE. The sub-statements of a `WITH` run in
    no set order, so nothing in it may depend on another: each changed row is updated once, the
    new rows are new (a reply's conversation is checked by its foreign key at the statement's
    end, when both are in), and all the events are one INSERT, so their keys are taken in the
    order of its rows (the order they were emitted)."""
    dialect = connection.dialect
    shape: list[tuple] = []
    params: list[Any] = []
    for row in changed:
        values, pk = _changed_values(row, now)
        if not values:
            continue
        model = type(row)
        shape.append(("update", model, tuple(values)))
        params.extend(_bind(dialect, model, key)(value) for key, value in values.items())
        params.append(pk)
    events: dict[str, Any] = {}
    for model in ADDED:
        rows = [row for row in added if type(row) is model]
        if not rows:
            continue
        plan = _insert_plan(dialect, model)
        given = [row.__dict__ for row in rows]
        # The columns any row gives or that have a Python default, in the table's order.
        present = set().union(*given)
        columns = [step for step in plan if step[0] in present or step[3] is not None]
        patterns = []
        for row, values in zip(rows, given):
            pattern = []
            for attr, column, process, default in columns:
                if attr in values:
                    value = values[attr]
                elif default is not None and not default.is_clause_element:
                    value = default.arg(None) if default.is_callable else default.arg
                else:
                    pattern.append(_EXPRESSION if default is not None else _DEFAULT)
                    continue
                pattern.append(_PARAM)
                params.append(value if process is None else process(value))
                if column == "id" and model is Event:
                    events[value] = row
            patterns.append(tuple(pattern))
        shape.append(("insert", model, tuple(step[1] for step in columns), tuple(patterns)))
    if not shape:
        return
    result = connection.exec_driver_sql(_statement(dialect, tuple(shape)), tuple(params))
    if shape[-1][1] is Event and shape[-1][0] == "insert":
        for event_id, seq in result.all():
            events[event_id].seq = seq


@functools.cache
def _insert_plan(dialect: sa.Dialect, model: type) -> tuple[tuple[str, str, Any, Any], ...]:
    """(attribute, column key, parameter conversion or None, Python default or None) of each of
    the model's columns, in the table's order: worked out once, not per row."""
    defaults = _defaults(model)
    table = model.__table__
    return tuple((attr, column, table.c[column].type.dialect_impl(dialect).bind_processor(dialect),
                  defaults.get(column)) for attr, column in _columns(model))


@functools.cache
def _defaults(model: type) -> dict[str, Any]:
    """The model's columns that have a default on the Python side (a value, a function or an SQL
    expression), by column key: what Core fills in for a column a row does not give."""
    return {column.key: column.default for column in model.__table__.columns if column.default is not None}


@functools.cache
def _bind(dialect: sa.Dialect, model: type, key: str) -> Any:
    """The column's parameter conversion on this dialect (JSON into text, say), as Core does it."""
    column = model.__table__.c[key]
    process = column.type.dialect_impl(dialect).bind_processor(dialect)
    return process if process is not None else _same


def _same(value: Any) -> Any:
    return value


@functools.cache
def _placeholder(dialect: sa.Dialect, model: type, key: str) -> str:
    """A positional parameter for the column, with the cast Core renders for it (`%s::JSON`)."""
    column = model.__table__.c[key]
    return str(sa.bindparam("p", type_=column.type).compile(dialect=dialect)).replace("%(p)s", "%s")


@functools.lru_cache(maxsize=512)
def _statement(dialect: sa.Dialect, shape: tuple) -> str:
    """The SQL of one shape of turn (made once per shape, then the same text every time)."""
    quote = dialect.identifier_preparer
    parts = []
    for piece in shape:
        model = piece[1]
        table = model.__table__
        if piece[0] == "update":
            [key_column] = table.primary_key.columns
            sets = ", ".join(f"{quote.quote(table.c[key].name)} = {_placeholder(dialect, model, key)}" for key in piece[2])
            parts.append(f"UPDATE {quote.format_table(table)} SET {sets} "
                         f"WHERE {quote.quote(key_column.name)} = {_placeholder(dialect, model, key_column.key)}")
            continue
        _, _, columns, patterns = piece
        expressions = {key: str(default.arg.compile(dialect=dialect))
                       for key, default in _defaults(model).items() if default.is_clause_element}
        rows = ", ".join("(" + ", ".join(
            _placeholder(dialect, model, column) if slot == _PARAM
            else expressions[column] if slot == _EXPRESSION else "DEFAULT"
            for column, slot in zip(columns, pattern)) + ")" for pattern in patterns)
        names = ", ".join(quote.quote(table.c[column].name) for column in columns)
        sql = f"INSERT INTO {quote.format_table(table)} ({names}) VALUES {rows}"
        if model is Event:
            sql += " RETURNING id, seq"
        parts.append(sql)
    *before, last = parts
    if not before:
        return last
    return "WITH " + ", ".join(f"w{i} AS ({sql})" for i, sql in enumerate(before)) + " " + last
