"""Welcome: a new contact's first message asks for opt-in.

YES / START are global opt-in keywords, so the engine records the consent and ends this
conversation itself; this flow only handles "no" and anything else (a gentle re-ask, once).
"""
from __future__ import annotations

from datetime import timedelta

from flows.toolkit import END, Flow, Inbound, Reply, Step, anything, keyword, route

NAME = "welcome"
MAX_REASKS = 1


def start(variables: dict) -> Step:
    """Greet the new contact and ask whether they want updates."""
    name = variables.get("name")
    return Step("awaiting_consent", replies=(Reply("welcome/ask_consent", {"name": name}),),
                data={"name": name, "reasks": 0})


def declined(message: Inbound, data: dict) -> Step:
    return Step(END, replies=(Reply("welcome/declined"),), data=data, outcome={"consent": "declined"})


def ask_again(message: Inbound, data: dict) -> Step:
    reasks = data.get("reasks", 0) + 1
    if reasks > MAX_REASKS:
        # They are talking about something else: stop asking, stay out of their way (and say
        # so, rather than leave the message unanswered).
        return Step(END, replies=(Reply("common/not_understood"),), data=data, outcome={"consent": "no_answer"})
    return Step("awaiting_consent", replies=(Reply("welcome/ask_again"),), data={**data, "reasks": reasks})


flow = Flow(
    name=NAME,
    description="Asks a new contact for opt-in (YES is handled by the engine's consent keywords).",
    start=start,
    start_to=("awaiting_consent",),
    states={
        "awaiting_consent": (
            route(keyword("no", "no thanks", "not now", "nope"), declined, to=END),
        ),
    },
    fallbacks=(route(anything(), ask_again, to=("awaiting_consent", END)),),
    timeout=timedelta(days=1),
)
