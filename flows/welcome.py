"""Welcome: a new contact's first message asks for opt-in.

Its traits say how it runs; the flow itself only handles "no" and anything else (a gentle
re-ask, once):

- `on_first_contact`: it starts on a contact's first message (consent unknown, never welcomed),
  when no entry point took that message;
- `asks_consent`: it is the opt-in question, so YES / START while it is open are always an opt-in
  (which ends it with {"consent": "opted_in"}), its {"consent": "declined"} outcome is recorded
  as a decline, and an opted-in contact is never put in it;
- `yields_to_entry_points`: a message another flow's entry point takes (FEEDBACK) ends it with
  {"consent": "no_answer"} and starts that flow, unless it is an answer to the question ("no");
- `backend_may_start`: POST /notify may start it too (with an optional `name`).
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
    """They said no: say goodbye; the outcome records the decline (`asks_consent`)."""
    return Step(END, replies=(Reply("welcome/declined"),), data=data, outcome={"consent": "declined"})


def ask_again(message: Inbound, data: dict) -> Step:
    """Neither yes nor no: ask once more, then give up without an answer."""
    reasks = data.get("reasks", 0) + 1
    if reasks > MAX_REASKS:
        # They are talking about something else: stop asking, stay out of their way (and say
        # so, rather than leave the message unanswered).
        return Step(END, replies=(Reply("common/not_understood"),), data=data, outcome={"consent": "no_answer"})
    return Step("awaiting_consent", replies=(Reply("welcome/ask_again"),), data={**data, "reasks": reasks})


flow = Flow(
    name=NAME,
    # docs/conversations.md prints this description above the diagram (`flask flows graph`): change both together.
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
    on_first_contact=True,
    asks_consent=True,
    yields_to_entry_points=True,
    yield_outcome={"consent": "no_answer"},
    backend_may_start=True,
)
