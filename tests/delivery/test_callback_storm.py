"""A storm of status callbacks, repeated and shuffled, through the signed webhook (invariant 3).

Thousands of callbacks over a few hundred messages arrive in any order, each one up to four
times, some before the send has recorded its SID. Whatever the order, every message ends at the
highest rank it was told, every distinct (SID, status) is kept once as an event, and every error
code is kept.
"""
from __future__ import annotations

import random
from collections import Counter

import pytest
import sqlalchemy as sa

from bot.delivery.statuses import apply_pending_events
from bot.extensions import db
from bot.models import Message, StatusEvent, new_id
from bot.vocabulary import RANK, MessageStatus
from tests.conftest import make_contact, status_form

MESSAGES = 400
#: What Twilio may tell about one message, by how it ends (each with its error code, if any).
PLANS = {
    "read": [("queued", None), ("sending", None), ("sent", None), ("delivered", None), ("read", None)],
    "delivered": [("queued", None), ("sent", None), ("delivered", None)],
    "undelivered": [("queued", None), ("sent", None), ("undelivered", 30003)],
    "failed": [("queued", None), ("failed", 63016)],
}


@pytest.mark.slow
def test_thousands_of_repeated_shuffled_callbacks_end_at_the_highest_rank(app, post_webhook):
    rng = random.Random(9)
    with app.app_context():
        contact = make_contact()
        messages = []
        for i in range(MESSAGES):
            ending = rng.choice(sorted(PLANS))
            # Every tenth send has not recorded its SID when its first callbacks arrive.
            sid = "SM%032x" % rng.getrandbits(128)
            late = i % 10 == 0
            messages.append({"id": new_id(), "sid": sid, "ending": ending, "late": late})
            db.session.add(Message(id=messages[-1]["id"], direction="outbound", contact_id=contact.id,
                                   body=f"note {i}", status="accepted", status_rank=RANK[MessageStatus.ACCEPTED],
                                   twilio_sid=None if late else sid))
        db.session.commit()

    posts = []
    for message in messages:
        # Twilio may skip statuses (never the last): a random subset of the way, then the end.
        steps = PLANS[message["ending"]]
        told = [step for step in steps[:-1] if rng.random() < 0.7] + [steps[-1]]
        message["told"] = told
        for status, code in told:
            posts += [(message["sid"], status, code)] * rng.randint(1, 4)
    rng.shuffle(posts)
    assert len(posts) >= 2000

    answers = Counter()
    for n, (sid, status, code) in enumerate(posts):
        answers[post_webhook(status_form(sid, status, error_code=code)).status_code] += 1
        if n == len(posts) // 2:
            # Halfway, the late sends record their SIDs and apply what came early (as the sender does).
            with app.app_context():
                for message in (m for m in messages if m["late"]):
                    db.session.execute(sa.update(Message).where(Message.id == message["id"])
                                       .values(twilio_sid=message["sid"]))
                    db.session.commit()
                    apply_pending_events(message["sid"], message["id"])
    assert answers == {200: len(posts)}

    with app.app_context():
        rows = {row.id: row for row in db.session.scalars(sa.select(Message))}
        events = Counter((e.twilio_sid, e.status) for e in db.session.scalars(sa.select(StatusEvent)))
        codes = {(e.twilio_sid, e.status): e.error_code for e in db.session.scalars(sa.select(StatusEvent))}
        unlinked = db.session.scalar(sa.select(sa.func.count()).select_from(StatusEvent)
                                     .where(StatusEvent.message_id.is_(None)))
    distinct = {(sid, status) for sid, status, _ in posts}
    assert set(events) == distinct and set(events.values()) == {1}  # each kept once
    assert unlinked == 0
    for message in messages:
        row = rows[message["id"]]
        final, code = max(message["told"], key=lambda step: RANK[MessageStatus(step[0])])
        assert (row.status, row.error_code) == (final, code), message
        for status, code in message["told"]:
            assert codes[(message["sid"], status)] == code
    duplicates = len(posts) - len(distinct)
    print(f"\ncallback storm: {len(posts)} posted, {len(distinct)} distinct stored once, "
          f"{duplicates} duplicates ignored, 0 lost, over {MESSAGES} messages")
