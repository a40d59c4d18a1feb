"""Conversations by flow and by status, and the outcomes they ended with."""
from __future__ import annotations

import json
from collections import Counter, defaultdict

import sqlalchemy as sa
from flask import Blueprint, render_template

from bot.extensions import db
from bot.models import Conversation
from bot.vocabulary import ConversationStatus

bp = Blueprint("conversations", __name__)

#: The most recent ended conversations whose outcomes are counted.
OUTCOME_SAMPLE = 2000


@bp.get("/conversations")
def by_flow():
    """Counts per flow and status; the outcomes of the last OUTCOME_SAMPLE ended conversations."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for flow, status, count in db.session.execute(
            sa.select(Conversation.flow, Conversation.status, sa.func.count())
            .group_by(Conversation.flow, Conversation.status)):
        counts[flow][status] = count
    outcomes: dict[str, Counter[str]] = defaultdict(Counter)
    for flow, outcome in db.session.execute(
            sa.select(Conversation.flow, Conversation.outcome).where(Conversation.ended_at.is_not(None))
            .order_by(Conversation.ended_at.desc()).limit(OUTCOME_SAMPLE)):
        outcomes[flow][json.dumps(outcome, sort_keys=True) if outcome else "(none)"] += 1
    return render_template("dashboard/conversations.html", counts=dict(sorted(counts.items())),
                           statuses=list(ConversationStatus), outcomes=outcomes)
