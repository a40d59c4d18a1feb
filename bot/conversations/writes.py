"""A turn's writes as Core statements built once, instead of the ORM's unit of work.

The stages add and change ORM rows without flushing (bot/conversations/store.py); at the end of
the turn `write_turn` writes them: one INSERT per table and column set (all its rows at once),
one UPDATE per changed row, then tells the session they are stored, so the commit's flush finds
nothing left to do. The unit of work cost about a fifth of a turn's CPU in bookkeeping around
the same statements (bench/THROUGHPUT.md, "The worker's hot path"). A session holding anything
else (a consent ledger row, say) is left to the ORM's flush whole, as before.
"""
from __future__ import annotations

import functools
import itertools
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
    commit: the caller's commit is the turn's (and enqueues its deferred work, outbox.py)."""
    session = db.session()
    added = list(session.new)
    changed = list(session.dirty)
    if not added and not changed:
        return
    if any(type(row) not in ADDED for row in added) or any(type(row) not in CHANGED for row in changed):
        return  # the commit's flush writes all of it, as it always could
    connection = session.connection()
    now = utcnow()
    for row in changed:
        _update_row(connection, row, now)
        session.expire(row)  # stored: nothing left to flush; it reads again after the commit
    added.sort(key=lambda row: sa.inspect(row).insert_order)  # events keep the order they were emitted
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
    for row in added:
        # Stored: persistent and clean, as after a flush (the outbox sees it as committed with
        # the transaction, and the commit expires it like every other row).
        session.expunge(row)
        make_transient_to_detached(row)
        session.add(row)


def _update_row(connection: sa.Connection, row: Any, now: Any) -> None:
    state = sa.inspect(row)
    model = type(row)
    values = {column: state.dict[attr] for attr, column in _columns(model)
              if attr in state.committed_state and attr in state.dict}
    if not values:
        return
    values.setdefault("updated_at", now)  # what the column's onupdate would set
    params = {f"v_{key}": value for key, value in values.items()}
    params["pk"] = state.identity[0]
    connection.execute(_update(model, tuple(values)), params)
