"""Feedback survey: a 1-5 rating, then an optional comment.

Started by the user ("feedback", "survey") or by the backend (POST /notify with
{"flow": "feedback", "variables": {"topic": "your visit on Monday"}}, `topic` optional).

Outcome, always with every key: {"rating": 1-5 or None, "comment": text or None,
"completed": bool, "topic": text or None}. `completed` is True once a rating was given and the
comment answered or skipped; a timeout (1 hour), a skipped rating or three invalid ratings leave it
False.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any, Mapping

from flows.toolkit import END, Flow, Inbound, Reply, Step, any_text, anything, keyword, parse_number, route

NAME = "feedback"

RATING = "rating"
COMMENT = "comment"

MIN_RATING, MAX_RATING = 1, 5
#: The third invalid answer to one question ends the survey.
MAX_INVALID = 3
TIMEOUT = timedelta(hours=1)

# Spelled-out ratings are accepted too; "stars" as emoji are not (normalize() drops emoji).
_RATING_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}

SKIP = keyword("skip", "no", "no thanks", "nothing", "nope")
#: Diagram label of the catch-all routes.
REASK = f"re-ask, end after {MAX_INVALID}"


def rating_of(message: Inbound) -> int | None:
    """The rating in a message: 1-5 typed ("4", " 4! "), spelled ("four") or a button payload."""
    value = parse_number(message)
    if value is None:
        value = _RATING_WORDS.get(message.answer)
    return value if value is not None and MIN_RATING <= value <= MAX_RATING else None


def is_rating(message: Inbound) -> bool:
    """Matcher: the message is a valid rating."""
    return rating_of(message) is not None


# --- start and timeout ------------------------------------------------------------------------

def start(variables: dict) -> Step:
    """Backend-started: ask for a rating, about `topic` if given.

    Raises ValueError when `topic` is not text.
    """
    topic = variables.get("topic")
    if topic is not None and (isinstance(topic, bool) or not isinstance(topic, (str, int, float))):
        raise ValueError("variable 'topic' must be a string or a number")
    text = str(topic).strip() if topic is not None else ""
    return _ask_rating(text or None, from_backend=True)


def on_timeout(data: dict) -> Step:
    """Silent for an hour: keep what was given, say nothing (a survey is not worth a nudge)."""
    return Step(END, data=data, outcome=_outcome(data, data.get("rating"), None, completed=False))


# --- handlers ---------------------------------------------------------------------------------

def begin_from_message(message: Inbound, data: dict) -> Step:
    """User-started: the same question, without a topic."""
    return _ask_rating(None, from_backend=False)


def got_rating(message: Inbound, data: dict) -> Step:
    """A valid rating: keep it and offer a comment."""
    rating = rating_of(message)
    data = {**data, "rating": rating, "invalid_answers": 0}
    return Step(COMMENT, replies=(Reply("feedback/ask_comment", {"rating": rating}),), data=data)


def skip_rating(message: Inbound, data: dict) -> Step:
    """They would rather not rate: end without one."""
    return Step(END, replies=(Reply("feedback/no_rating", {}),), data=data,
                outcome=_outcome(data, None, None, completed=False))


def reask_rating(message: Inbound, data: dict) -> Step:
    """Not a rating: repeat the allowed range, or give up on the third try."""
    count = int(data.get("invalid_answers", 0)) + 1
    data = {**data, "invalid_answers": count}
    if count >= MAX_INVALID:
        return Step(END, replies=(Reply("feedback/no_rating", {}),), data=data,
                    outcome=_outcome(data, None, None, completed=False))
    reask = Reply("feedback/reask_rating", {"minimum": MIN_RATING, "maximum": MAX_RATING})
    return Step(RATING, replies=(reask,), data=data)


def got_comment(message: Inbound, data: dict) -> Step:
    """Any text is the comment (a photo's caption included)."""
    return _thanks(data, message.text.strip())


def skip_comment(message: Inbound, data: dict) -> Step:
    """No comment: the survey is complete all the same."""
    return _thanks(data, None)


def reask_comment(message: Inbound, data: dict) -> Step:
    """Media, a location, ...: ask for words; after the third, finish without a comment."""
    count = int(data.get("invalid_answers", 0)) + 1
    data = {**data, "invalid_answers": count}
    if count >= MAX_INVALID:
        return _thanks(data, None)
    return Step(COMMENT, replies=(Reply("feedback/reask_comment", {}),), data=data)


# --- the flow ---------------------------------------------------------------------------------

flow = Flow(
    name=NAME,
    description="A 1-5 rating, then an optional comment.",
    entry_points=(
        route(keyword("feedback", "survey"), begin_from_message, to=RATING),
    ),
    start=start,
    start_to=(RATING,),
    start_content_template="feedback_request",
    states={
        RATING: (
            route(is_rating, got_rating, to=COMMENT, label=f"{MIN_RATING}-{MAX_RATING}"),
            route(SKIP, skip_rating, to=END, label="skip, no"),
            route(anything(), reask_rating, to=(RATING, END), label=f"else ({REASK})"),
        ),
        COMMENT: (
            route(SKIP, skip_comment, to=END, label="skip, no"),  # before any_text(): "no" is not a comment
            route(any_text(), got_comment, to=END),
            route(anything(), reask_comment, to=(COMMENT, END), label=f"no text ({REASK})"),
        ),
    },
    timeout=TIMEOUT,
    on_timeout=on_timeout,
    timeout_to=(END,),
)


# --- helpers ----------------------------------------------------------------------------------

def _ask_rating(topic: str | None, *, from_backend: bool) -> Step:
    question = Reply(
        "feedback/ask_rating",
        {"topic": topic},
        # The backend may start the survey long after the user last wrote; the approved template
        # is generic (no variables) because `topic` is optional.
        content_template="feedback_request" if from_backend else None,
    )
    return Step(RATING, replies=(question,), data={"topic": topic, "rating": None, "invalid_answers": 0})


def _thanks(data: Mapping[str, Any], comment: str | None) -> Step:
    rating = data.get("rating")
    return Step(END, replies=(Reply("feedback/thanks", {"rating": rating}),), data=dict(data),
                outcome=_outcome(data, rating, comment, completed=True))


def _outcome(data: Mapping[str, Any], rating: int | None, comment: str | None, *,
             completed: bool) -> dict[str, Any]:
    return {"rating": rating, "comment": comment, "completed": completed, "topic": data.get("topic")}
