"""A batch's claim beside a backlog checks its contacts' order on a shortlist, not the backlog.

A claim checks, for each message it takes, that no older message of its contact is still unsent
(`claims._earlier_unsent_message`), one probe per message checked. Run on every due message of a
backlog whose rows the planner's statistics have not seen yet (the usual case: a burst of /notify
fills the unsent rows faster than autovacuum analyzes them), each probe read the whole backlog: a
claim of 49 beside 2,000 pending took 0.9-1.4 s of PostgreSQL's CPU. The batch's claim now runs
the check on a shortlist of SHORTLIST_FACTOR per place (`claims._claim_along_statement`).
"""
from __future__ import annotations

import json
from datetime import timedelta

import pytest
import sqlalchemy as sa

from bot.clock import utcnow
from bot.delivery import claims
from bot.extensions import db
from bot.models import Contact, Message
from bot.vocabulary import Direction, Kind, MessageStatus

BACKLOG = 600


def _subplans(node: dict) -> list[dict]:
    """Every node of the plan below a SubPlan, depth first."""
    found = []
    for child in node.get("Plans", []):
        if child.get("Subplan Name", "").startswith("SubPlan"):
            found.append(child)
        found += _subplans(child)
    return found


def test_a_batchs_claim_checks_the_contact_order_of_a_shortlist_not_of_the_whole_backlog(app) -> None:
    with app.app_context():
        if db.engine.dialect.name != "postgresql":
            pytest.skip("the plan is PostgreSQL's (TEST_DATABASE_URL)")
        now = utcnow()
        db.session.execute(sa.insert(Contact), [
            {"phone": f"+1556200{i:04d}", "wa_id": f"1556200{i:04d}", "consent": "opted_in",
             "last_inbound_at": now, "created_at": now, "updated_at": now} for i in range(BACKLOG)])
        contact_ids = db.session.scalars(sa.select(Contact.id).where(Contact.phone.like("+1556200%"))).all()
        db.session.add_all(Message(direction=Direction.OUTBOUND, kind=Kind.NOTIFICATION, contact_id=contact_id,
                                   body="backlog", status=MessageStatus.PENDING, status_rank=0)
                           for contact_id in contact_ids)
        db.session.commit()
        # The claim as the sender runs it (captured as the driver gets it, then undone), explained.
        captured: list[tuple[str, object]] = []

        def capture(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
            captured.append((statement, parameters))

        connection = db.session.connection()
        sa.event.listen(connection, "before_cursor_execute", capture)
        try:
            with connection.begin_nested() as savepoint:
                claims_made = connection.execute(claims._claim_along_statement(True), {
                    "exclude_id": "none", "now": now, "lease_until": now + timedelta(seconds=30), "limit": 49,
                    "shortlist": 49 * claims.SHORTLIST_FACTOR, "own_channel": "whatsapp",
                    "of_broadcast": False}).all()
                savepoint.rollback()
        finally:
            sa.event.remove(connection, "before_cursor_execute", capture)
        assert len(claims_made) == 49
        statement, parameters = next((sql, given) for sql, given in captured if sql.lstrip().startswith("UPDATE"))
        plan = connection.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters).scalar()
        plan = plan if isinstance(plan, list) else json.loads(plan)
        db.session.rollback()
        checks = _subplans(plan[0]["Plan"])
        assert checks, "the contact-order check runs as a subplan per message checked"
        for check in checks:
            # Whatever index the planner takes for it, it runs for the shortlist only.
            assert check["Actual Loops"] <= 49 * claims.SHORTLIST_FACTOR < BACKLOG, check
