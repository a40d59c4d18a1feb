"""The appointment and feedback flows as pure code: no Flask, no database.

Each conversation is a table of turns (what the user sends, the state expected after it, the reply
templates expected), played through Flow.begin / Flow.handle / Flow.expire with Step.data carried
forward exactly as the engine stores it. The same tables feed the checks that every route is
exercised, that the diagram metadata (`to=`, start_to, timeout_to) tells the truth, and that every
reply renders with the variables it actually carries.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from jinja2 import Environment, FileSystemLoader, StrictUndefined, UndefinedError

from flows import appointment, feedback
from flows.toolkit import END, Flow, Inbound, Location, Media, Route, Step

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "templates"


# --- messages ---------------------------------------------------------------------------------

def btn(payload: str, label: str) -> Inbound:
    """A quick-reply button press as Twilio posts it (the label is also the Body)."""
    return Inbound.from_twilio({"Body": label, "ButtonPayload": payload, "ButtonText": label})


PHOTO = Inbound(media=(Media("https://api.twilio.com/media/ME1", "image/jpeg"),))
VOICE_NOTE = Inbound(media=(Media("https://api.twilio.com/media/ME2", "audio/ogg"),))
PIN = Inbound(location=Location(51.5034, -0.1276, "10 Downing Street"))
EMPTY = Inbound()  # e.g. a sticker or reaction Twilio forwards without Body


def as_inbound(message: str | Inbound) -> Inbound:
    return message if isinstance(message, Inbound) else Inbound(text=message)


# --- playing a conversation -------------------------------------------------------------------

Turn = tuple["str | Inbound", str, tuple[str, ...]]


@dataclass
class Move:
    """One transition: where it started, which route took it (None for begin/expire), the Step."""

    before: str | None
    route: Route | None
    step: Step


def matching_route(flow: Flow, state: str | None, message: Inbound) -> Route | None:
    """The route Flow.handle will run, to check its declared `to=` against what happened."""
    return next((r for r in flow.routes_for(state) if r.matcher(message)), None)


def storable(data: Mapping[str, Any]) -> dict[str, Any]:
    """Data as the engine persists it (JSON), so nothing that would not survive storage slips by."""
    return json.loads(json.dumps(dict(data)))


def play(flow: Flow, opening: Mapping[str, Any] | None, turns: Sequence[Turn]) -> list[Move]:
    """Begin (backend variables) or wait for an entry point (None), then play `turns`, asserting
    the state and reply templates after each one."""
    moves: list[Move] = []
    state: str | None = None
    data: dict[str, Any] = {}
    if opening is not None:
        step = flow.begin(opening)
        moves.append(Move(None, None, step))
        state, data = step.state, storable(step.data)
    for number, (sent, expected_state, expected_templates) in enumerate(turns, 1):
        assert state != END, f"turn {number}: the conversation already ended"
        message = as_inbound(sent)
        step = flow.handle(state, message, data)
        assert step is not None, f"turn {number}: nothing matched {sent!r} in state {state!r}"
        assert step.state == expected_state, f"turn {number}: {sent!r} in {state!r}"
        assert tuple(r.template for r in step.replies) == expected_templates, f"turn {number}: {sent!r}"
        assert (step.outcome is not None) == (step.state == END), "an outcome exactly when it ends"
        moves.append(Move(state, matching_route(flow, state, message), step))
        state, data = step.state, storable(step.data)
    return moves


def subset(expected: Mapping[str, Any], actual: Mapping[str, Any] | None) -> bool:
    return actual is not None and all(key in actual and actual[key] == value for key, value in expected.items())


# --- the appointment reminder -----------------------------------------------------------------

VARS = {"name": "Ada", "date": "Tue 14 May", "time": "10:30", "place": "Main Street Clinic",
        "appointment_id": "apt-42"}

AWAIT, NEW_TIME = appointment.AWAITING_ANSWER, appointment.AWAITING_NEW_TIME
CONFIRMED = ("appointment/confirmed",)
CANCELLED = ("appointment/cancelled",)
ASK_TIME = ("appointment/ask_new_time",)
GOT_TIME = ("appointment/reschedule_received",)
REASK = ("appointment/reask",)
REASK_TIME = ("appointment/reask_new_time",)
GAVE_UP = ("appointment/no_answer",)

APPOINTMENT_CASES = [
    # Confirm: the button, and every typed form.
    pytest.param([(btn("CONFIRM", "Confirm"), END, CONFIRMED)], {"answer": "confirmed"}, id="confirm-button"),
    *[pytest.param([(typed, END, CONFIRMED)], {"answer": "confirmed"}, id=f"confirm-typed-{typed.strip()}")
      for typed in ("1", "  Confirm! ", "confirm", "CONFIRMED", "yes", "Yes.", "ok", "OK!!", "okay", "#1", "1.")],
    # Cancel: the button, 3, "cancel appointment" (bare "cancel" is the engine's opt-out word).
    pytest.param([(btn("CANCEL", "Cancel appointment"), END, CANCELLED)], {"answer": "cancelled"},
                 id="cancel-button"),
    *[pytest.param([(typed, END, CANCELLED)], {"answer": "cancelled"}, id=f"cancel-typed-{typed.strip()}")
      for typed in ("3", " 3 ", "Cancel appointment", "CANCEL APPOINTMENT!", "cancel my appointment")],
    # Reschedule: the button or typed, then a free-text time.
    pytest.param([(btn("RESCHEDULE", "Reschedule"), NEW_TIME, ASK_TIME),
                  ("Thursday after 3pm", END, GOT_TIME)],
                 {"answer": "reschedule", "requested_time": "Thursday after 3pm"}, id="reschedule-button"),
    *[pytest.param([(typed, NEW_TIME, ASK_TIME), ("  next week, any morning  ", END, GOT_TIME)],
                   {"answer": "reschedule", "requested_time": "next week, any morning"},
                   id=f"reschedule-typed-{typed.strip()}")
      for typed in ("2", "Reschedule", "  CHANGE? ", "another time")],
    # While waiting for a time, a typed number is a time ("3" o'clock), not the cancel choice.
    pytest.param([("2", NEW_TIME, ASK_TIME), ("3", END, GOT_TIME)],
                 {"answer": "reschedule", "requested_time": "3"}, id="reschedule-typed-number-is-a-time"),
    # User text is data, never template source.
    pytest.param([("2", NEW_TIME, ASK_TIME), ("{{ 7 * 7 }} {% if x %}", END, GOT_TIME)],
                 {"answer": "reschedule", "requested_time": "{{ 7 * 7 }} {% if x %}"}, id="reschedule-jinja-text"),
    # A photo with a caption: the caption is the requested time.
    pytest.param([("2", NEW_TIME, ASK_TIME),
                  (Inbound(text="Friday 9am", media=PHOTO.media), END, GOT_TIME)],
                 {"answer": "reschedule", "requested_time": "Friday 9am"}, id="reschedule-caption"),
    # The reminder's buttons still work while waiting for a time: they changed their mind.
    pytest.param([("2", NEW_TIME, ASK_TIME), (btn("CONFIRM", "Confirm"), END, CONFIRMED)],
                 {"answer": "confirmed"}, id="new-time-then-confirm-button"),
    pytest.param([("2", NEW_TIME, ASK_TIME), (btn("CANCEL", "Cancel appointment"), END, CANCELLED)],
                 {"answer": "cancelled"}, id="new-time-then-cancel-button"),
    pytest.param([("2", NEW_TIME, ASK_TIME), (btn("RESCHEDULE", "Reschedule"), NEW_TIME, ASK_TIME),
                  ("Saturday", END, GOT_TIME)],
                 {"answer": "reschedule", "requested_time": "Saturday"}, id="new-time-then-reschedule-button"),
    # Invalid answers: re-asked twice, the third hands over to a person.
    pytest.param([("maybe", AWAIT, REASK), ("what?", AWAIT, REASK), ("4", END, GAVE_UP)],
                 {"answer": "no_answer", "reschedule_requested": False}, id="three-invalid"),
    pytest.param([(PHOTO, AWAIT, REASK), (PIN, AWAIT, REASK), (EMPTY, END, GAVE_UP)],
                 {"answer": "no_answer"}, id="three-non-text"),
    pytest.param([("cancel it please", AWAIT, REASK), ("0", AWAIT, REASK), ("  1 ", END, CONFIRMED)],
                 {"answer": "confirmed"}, id="two-invalid-then-confirm"),
    # Choosing "reschedule" is a new question: two earlier misses don't count against it.
    pytest.param([("hm", AWAIT, REASK), ("??", AWAIT, REASK), ("2", NEW_TIME, ASK_TIME),
                  (PHOTO, NEW_TIME, REASK_TIME), (VOICE_NOTE, NEW_TIME, REASK_TIME),
                  ("Monday 4pm", END, GOT_TIME)],
                 {"answer": "reschedule", "requested_time": "Monday 4pm"}, id="reask-count-resets"),
    pytest.param([(btn("RESCHEDULE", "Reschedule"), NEW_TIME, ASK_TIME), (PHOTO, NEW_TIME, REASK_TIME),
                  (PIN, NEW_TIME, REASK_TIME), (EMPTY, END, GAVE_UP)],
                 {"answer": "no_answer", "reschedule_requested": True}, id="no-time-given"),
]


@pytest.mark.parametrize("turns, outcome", APPOINTMENT_CASES)
def test_appointment_conversation(turns: list[Turn], outcome: dict[str, Any]) -> None:
    moves = play(appointment.flow, VARS, turns)
    last = moves[-1].step
    assert subset(outcome, last.outcome), last.outcome
    # Every outcome tells the backend which appointment it is about.
    assert subset({"appointment_id": "apt-42", "date": "Tue 14 May", "time": "10:30"}, last.outcome)


def test_appointment_outcomes_are_exact() -> None:
    """The whole outcome, not just the keys the table checks."""
    confirmed = play(appointment.flow, VARS, [("1", END, CONFIRMED)])[-1].step
    assert confirmed.outcome == {"answer": "confirmed", "appointment_id": "apt-42",
                                 "date": "Tue 14 May", "time": "10:30"}
    rescheduled = play(appointment.flow, {"date": "1 June", "time": "9:00"},
                       [("2", NEW_TIME, ASK_TIME), ("after lunch", END, GOT_TIME)])[-1].step
    assert rescheduled.outcome == {"answer": "reschedule", "appointment_id": None, "date": "1 June",
                                   "time": "9:00", "requested_time": "after lunch"}


def test_appointment_start_sends_the_reminder() -> None:
    step = appointment.flow.begin(VARS)
    assert step.state == AWAIT
    (reminder,) = step.replies
    assert reminder.template == "appointment/reminder"
    assert reminder.variables == {"name": "Ada", "date": "Tue 14 May", "time": "10:30",
                                  "place": "Main Street Clinic"}
    assert reminder.content_template == "appointment_reminder"
    assert reminder.content_variables == {"1": "Tue 14 May", "2": "10:30"}
    assert subset(VARS, step.data), "the variables are carried in the conversation data"
    assert step.data["invalid_answers"] == 0
    assert step.outcome is None


def test_appointment_start_cleans_optional_and_numeric_variables() -> None:
    step = appointment.flow.begin({"date": " 2024-05-14 ", "time": 1030, "name": "  ", "appointment_id": 7})
    (reminder,) = step.replies
    assert reminder.variables == {"name": None, "date": "2024-05-14", "time": "1030", "place": None}
    assert reminder.content_variables == {"1": "2024-05-14", "2": "1030"}
    assert step.data["appointment_id"] == 7


@pytest.mark.parametrize("variables, named", [
    pytest.param({"time": "10:30"}, ["'date'"], id="no-date"),
    pytest.param({"date": "Tue 14 May"}, ["'time'"], id="no-time"),
    pytest.param({"date": None, "time": "10:30"}, ["'date'"], id="date-null"),
    pytest.param({"date": "   ", "time": "10:30"}, ["'date'"], id="date-blank"),
    pytest.param({"name": "Ada"}, ["'date'", "'time'"], id="neither"),
    pytest.param({"date": ["Tue"], "time": "10:30"}, ["'date'"], id="date-not-text"),
    pytest.param({"date": "Tue", "time": "10:30", "place": {"x": 1}}, ["'place'"], id="place-not-text"),
    pytest.param({"date": "Tue", "time": "10:30", "appointment_id": {"id": 1}}, ["'appointment_id'"], id="bad-id"),
])
def test_appointment_start_rejects_bad_variables(variables: dict[str, Any], named: list[str]) -> None:
    with pytest.raises(ValueError) as raised:
        appointment.flow.begin(variables)
    for name in named:
        assert name in str(raised.value)


def test_appointment_is_started_only_by_the_backend() -> None:
    # No entry points: a stray "confirm" with no conversation is left to the engine.
    assert appointment.flow.handle(None, Inbound(text="confirm"), {}) is None
    assert appointment.flow.required_variables == ("date", "time")
    assert appointment.flow.start_content_template == "appointment_reminder"


@pytest.mark.parametrize("turns, reschedule_requested", [
    pytest.param([], False, id="right-after-the-reminder"),
    pytest.param([("maybe", AWAIT, REASK)], False, id="after-a-reask"),
    pytest.param([("2", NEW_TIME, ASK_TIME)], True, id="while-waiting-for-a-time"),
])
def test_appointment_timeout(turns: list[Turn], reschedule_requested: bool) -> None:
    data = play(appointment.flow, VARS, turns)[-1].step.data
    step = appointment.flow.expire(storable(data))
    assert step.state == END
    assert step.outcome == {"answer": "no_response", "appointment_id": "apt-42", "date": "Tue 14 May",
                            "time": "10:30", "reschedule_requested": reschedule_requested}
    (nudge,) = step.replies
    assert nudge.template == "appointment/no_response"
    # A day later the 24-hour window has usually closed: only an approved template can go out.
    assert nudge.content_template == "appointment_no_response"
    assert nudge.content_variables == {"1": "Tue 14 May", "2": "10:30"}
    assert appointment.flow.timeout is not None and appointment.flow.timeout.total_seconds() == 24 * 3600


# --- the feedback survey ----------------------------------------------------------------------

RATING, COMMENT = feedback.RATING, feedback.COMMENT
ASK_RATING = ("feedback/ask_rating",)
REASK_RATING = ("feedback/reask_rating",)
NO_RATING = ("feedback/no_rating",)
ASK_COMMENT = ("feedback/ask_comment",)
REASK_COMMENT = ("feedback/reask_comment",)
THANKS = ("feedback/thanks",)

BACKEND = {"topic": "your visit on Monday"}
USER = None  # started by the user's message: the first turn is the entry point

FEEDBACK_CASES = [
    pytest.param(BACKEND, [("5", COMMENT, ASK_COMMENT), ("Lovely staff!", END, THANKS)],
                 {"rating": 5, "comment": "Lovely staff!", "completed": True, "topic": "your visit on Monday"},
                 id="backend-rating-comment"),
    pytest.param(USER, [("Feedback!", RATING, ASK_RATING), (btn("4", "Good"), COMMENT, ASK_COMMENT),
                        ("skip", END, THANKS)],
                 {"rating": 4, "comment": None, "completed": True, "topic": None}, id="user-button-skip"),
    pytest.param(USER, [("  SURVEY ", RATING, ASK_RATING), (" 1. ", COMMENT, ASK_COMMENT),
                        ("No thanks", END, THANKS)],
                 {"rating": 1, "comment": None, "completed": True}, id="user-survey-no-thanks"),
    pytest.param(BACKEND, [("3", COMMENT, ASK_COMMENT), ("NO", END, THANKS)],
                 {"rating": 3, "comment": None, "completed": True}, id="comment-no"),
    pytest.param(BACKEND, [("Five", COMMENT, ASK_COMMENT), ("ok", END, THANKS)],
                 {"rating": 5, "comment": "ok", "completed": True}, id="rating-spelled"),
    pytest.param(BACKEND, [(btn("2", "Poor"), COMMENT, ASK_COMMENT),
                           ("{{ config }} waited 40 minutes", END, THANKS)],
                 {"rating": 2, "comment": "{{ config }} waited 40 minutes"}, id="comment-jinja-text"),
    # Out of range or not a number: re-ask with the range, give up on the third.
    pytest.param(BACKEND, [("0", RATING, REASK_RATING), ("6", RATING, REASK_RATING),
                           ("five stars", END, NO_RATING)],
                 {"rating": None, "comment": None, "completed": False}, id="three-invalid-ratings"),
    pytest.param(BACKEND, [("10", RATING, REASK_RATING), ("4.5", RATING, REASK_RATING),
                           ("4", COMMENT, ASK_COMMENT), ("Quick and friendly", END, THANKS)],
                 {"rating": 4, "comment": "Quick and friendly", "completed": True}, id="two-invalid-then-valid"),
    pytest.param(BACKEND, [(PHOTO, RATING, REASK_RATING), ("great", RATING, REASK_RATING),
                           (PIN, END, NO_RATING)],
                 {"rating": None, "completed": False}, id="non-text-ratings"),
    pytest.param(BACKEND, [("Skip", END, NO_RATING)],
                 {"rating": None, "comment": None, "completed": False}, id="skip-rating"),
    # The comment must be words: media or a location is re-asked politely.
    pytest.param(BACKEND, [("4", COMMENT, ASK_COMMENT), (PHOTO, COMMENT, REASK_COMMENT),
                           (PIN, COMMENT, REASK_COMMENT), ("The app is slow", END, THANKS)],
                 {"rating": 4, "comment": "The app is slow", "completed": True}, id="media-then-comment"),
    pytest.param(BACKEND, [("0", RATING, REASK_RATING), ("4", COMMENT, ASK_COMMENT),
                           (VOICE_NOTE, COMMENT, REASK_COMMENT), (EMPTY, COMMENT, REASK_COMMENT),
                           (PHOTO, END, THANKS)],
                 {"rating": 4, "comment": None, "completed": True}, id="three-non-text-comments"),
    pytest.param(BACKEND, [("5", COMMENT, ASK_COMMENT),
                           (Inbound(text="Look at this view", media=PHOTO.media), END, THANKS)],
                 {"rating": 5, "comment": "Look at this view", "completed": True}, id="caption-is-the-comment"),
]


@pytest.mark.parametrize("opening, turns, outcome", FEEDBACK_CASES)
def test_feedback_conversation(opening: dict[str, Any] | None, turns: list[Turn],
                               outcome: dict[str, Any]) -> None:
    moves = play(feedback.flow, opening, turns)
    last = moves[-1].step
    assert subset(outcome, last.outcome), last.outcome
    assert set(last.outcome or {}) == {"rating", "comment", "completed", "topic"}


def test_feedback_backend_start() -> None:
    step = feedback.flow.begin({"topic": "  your order #123 "})
    assert step.state == RATING
    (question,) = step.replies
    assert question.template == "feedback/ask_rating"
    assert question.variables == {"topic": "your order #123"}
    assert question.content_template == "feedback_request"
    assert feedback.flow.start_content_template == "feedback_request"
    assert feedback.flow.begin({}).replies[0].variables == {"topic": None}
    with pytest.raises(ValueError, match="'topic'"):
        feedback.flow.begin({"topic": ["x"]})


def test_feedback_user_start_only_on_its_keywords() -> None:
    assert feedback.flow.handle(None, Inbound(text="hello"), {}) is None
    assert feedback.flow.handle(None, Inbound(text="feedback please"), {}) is None
    step = feedback.flow.handle(None, Inbound(text="Feedback"), {})
    assert step is not None and step.state == RATING
    # In the window already (they just wrote): no approved template needed.
    assert step.replies[0].content_template is None


def test_feedback_reask_states_the_range() -> None:
    step = feedback.flow.handle(RATING, Inbound(text="7"), {"topic": None, "rating": None, "invalid_answers": 0})
    assert step is not None
    assert step.replies[0].variables == {"minimum": 1, "maximum": 5}


@pytest.mark.parametrize("opening, turns, outcome", [
    pytest.param(BACKEND, [],
                 {"rating": None, "comment": None, "completed": False, "topic": "your visit on Monday"},
                 id="before-rating"),
    pytest.param(BACKEND, [("9", RATING, REASK_RATING)], {"rating": None, "completed": False}, id="after-a-reask"),
    pytest.param(USER, [("survey", RATING, ASK_RATING), ("4", COMMENT, ASK_COMMENT)],
                 {"rating": 4, "comment": None, "completed": False, "topic": None}, id="before-comment"),
])
def test_feedback_timeout(opening: dict[str, Any] | None, turns: list[Turn], outcome: dict[str, Any]) -> None:
    data = play(feedback.flow, opening, turns)[-1].step.data
    step = feedback.flow.expire(storable(data))
    assert step.state == END
    assert subset(outcome, step.outcome), step.outcome
    assert step.replies == (), "a survey that timed out ends silently"
    assert feedback.flow.timeout is not None and feedback.flow.timeout.total_seconds() == 3600


# --- every conversation above, for the checks that span them ----------------------------------

def every_conversation() -> Iterator[tuple[Flow, list[Move]]]:
    """Every case of both tables, plus the begin/expire variants, as played moves."""
    for case in APPOINTMENT_CASES:
        turns, _ = case.values
        yield appointment.flow, play(appointment.flow, VARS, turns)
    for minimal in ({"date": "Tue 14 May", "time": "10:30"}, VARS):
        moves = play(appointment.flow, minimal, [("2", NEW_TIME, ASK_TIME)])
        for i in (0, 1):  # time out after the reminder, and while waiting for a time
            timed_out = Move(moves[i].step.state, None, appointment.flow.expire(moves[i].step.data))
            yield appointment.flow, [*moves[: i + 1], timed_out]
    for case in FEEDBACK_CASES:
        opening, turns, _ = case.values
        yield feedback.flow, play(feedback.flow, opening, turns)
    for opening in ({}, BACKEND):
        moves = play(feedback.flow, opening, [("4", COMMENT, ASK_COMMENT)])
        yield feedback.flow, [*moves, Move(COMMENT, None, feedback.flow.expire(moves[-1].step.data))]


def test_every_route_is_exercised() -> None:
    used = {id(move.route) for _, moves in every_conversation() for move in moves if move.route}
    for flow in (appointment.flow, feedback.flow):
        routes = [*flow.entry_points, *flow.fallbacks, *(r for rs in flow.states.values() for r in rs)]
        unused = [f"{flow.name}: {r.label or r.handler.__name__}" for r in routes if id(r) not in used]
        assert not unused


def test_diagram_metadata_matches_what_happens() -> None:
    """`to=`, start_to and timeout_to drive `flask flows graph`: each must cover every real move."""
    for flow, moves in every_conversation():
        for move in moves:
            if move.route is not None:
                assert move.step.state in move.route.to, (flow.name, move.before, move.route.label)
            elif move.before is None:
                assert move.step.state in flow.start_to
            else:
                assert move.step.state in flow.timeout_to
        # Every declared target exists.
        for routes in [flow.entry_points, flow.fallbacks, *flow.states.values()]:
            for r in routes:
                assert r.to and all(target == END or target in flow.states for target in r.to)


# --- templates --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def jinja() -> Environment:
    # As bot/conversations/replies.py renders: strict undefined, no HTML escaping, block whitespace trimmed.
    return Environment(loader=FileSystemLoader(str(TEMPLATES)), undefined=StrictUndefined, autoescape=False,
                       keep_trailing_newline=False, trim_blocks=True, lstrip_blocks=True)


def test_every_reply_renders_with_the_variables_it_carries(jinja: Environment) -> None:
    rendered: dict[str, set[str]] = {}
    for _, moves in every_conversation():
        for move in moves:
            for reply in move.step.replies:
                text = jinja.get_template(f"{reply.template}.txt").render(dict(reply.variables)).strip()
                assert text, reply.template
                assert "None" not in text, f"{reply.template} printed an absent optional variable: {text!r}"
                assert len(text) <= 1600, reply.template
                if reply.content_variables is not None:
                    assert all(isinstance(v, str) and v for v in reply.content_variables.values()), reply
                rendered.setdefault(reply.template, set()).add(text)
    # Every template file is reachable, and every reachable template exists (get_template above).
    on_disk = {f"{p.parent.name}/{p.stem}" for folder in ("appointment", "feedback")
               for p in (TEMPLATES / folder).glob("*.txt")}
    assert set(rendered) == on_disk
    # User text came through as text, never evaluated as template source.
    assert any("{{ 7 * 7 }} {% if x %}" in t for t in rendered["appointment/reschedule_received"])
    # Optional variables appear when given and vanish cleanly when not.
    reminders = rendered["appointment/reminder"]
    assert any("Hi Ada!" in t and "Main Street Clinic" in t for t in reminders)
    assert any(t.startswith("Hi! ") and "Clinic" not in t for t in reminders)
    assert any("How was your visit on Monday?" in t for t in rendered["feedback/ask_rating"])
    assert any("How are we doing?" in t for t in rendered["feedback/ask_rating"])


def test_copy_never_suggests_the_bare_opt_out_word(jinja: Environment) -> None:
    """"cancel" alone unsubscribes the user (engine keyword): the copy must say "cancel appointment"."""
    for name in ("reminder", "reask"):
        text = jinja.get_template(f"appointment/{name}.txt").render(
            {"name": None, "date": "d", "time": "t", "place": None})
        assert '"cancel appointment"' in text and "3" in text


def test_a_missing_variable_fails_rendering(jinja: Environment) -> None:
    """The render check above would catch a template asking for a variable its Reply lacks."""
    with pytest.raises(UndefinedError):
        jinja.get_template("appointment/reminder.txt").render({"date": "Tue", "time": "10:30"})
    with pytest.raises(UndefinedError):
        jinja.get_template("feedback/ask_comment.txt").render({})


def test_flows_are_pure_code() -> None:
    """Neither flow pulls in Flask, SQLAlchemy or the app (checked in a fresh interpreter)."""
    code = ("import sys, flows.appointment, flows.feedback; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('flask', 'sqlalchemy', 'bot')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("text, expected", [("4", 4), (" 4. ", 4), ("#4", 4), ("-1", None), ("4.5", None),
                                            ("four", None), ("", None)])
def test_parse_number_reads_whole_non_negative_numbers(text, expected):
    from flows.toolkit import Inbound, parse_number

    assert parse_number(Inbound(text=text)) == expected


def test_empty_keywords_match_nothing():
    from flows.toolkit import Inbound, keyword

    assert not keyword("", "🙂")(Inbound(text=""))


# --- matchers compose -------------------------------------------------------------------------

def test_matchers_compose_with_or_and_not() -> None:
    from flows.toolkit import Matcher, button, keyword, media

    yes, photo = keyword("yes"), media("image/")
    assert isinstance(yes | photo, Matcher)
    assert (yes | photo)(Inbound(text="Yes!")) and (yes | photo)(PHOTO) and not (yes | photo)(PIN)
    captioned = Inbound(text="yes", media=PHOTO.media)
    assert (yes & photo)(captioned) and not (yes & photo)(Inbound(text="yes")) and not (yes & photo)(PHOTO)
    assert (~yes)(Inbound(text="no")) and not (~yes)(Inbound(text="yes"))
    assert (button("CONFIRM") | keyword("1"))(btn("CONFIRM", "Confirm"))


@pytest.mark.parametrize("build, label", [
    pytest.param(lambda a, b, c: a | b, "a or b", id="or"),
    pytest.param(lambda a, b, c: a & b, "a and b", id="and"),
    pytest.param(lambda a, b, c: ~a, "not a", id="not"),
    pytest.param(lambda a, b, c: a | b | c, "a or b or c", id="or-chain"),
    pytest.param(lambda a, b, c: a & b & c, "a and b and c", id="and-chain"),
    pytest.param(lambda a, b, c: (a | b) & c, "(a or b) and c", id="or-in-and"),
    pytest.param(lambda a, b, c: a | (b & c), "a or (b and c)", id="and-in-or"),
    pytest.param(lambda a, b, c: ~(a | b), "not (a or b)", id="not-or"),
    pytest.param(lambda a, b, c: ~a & b, "not a and b", id="not-binds-tightest"),
])
def test_composed_labels_read_well(build, label: str) -> None:
    from flows.toolkit import Matcher

    a, b, c = (Matcher(lambda m: True, name) for name in "abc")
    assert build(a, b, c).label == label


def test_catch_all_of_compositions() -> None:
    from flows.toolkit import any_text, anything, keyword

    word, text = keyword("x"), any_text()
    assert text.catch_all and anything().catch_all and not word.catch_all
    assert (word | text).catch_all and (text | word).catch_all, "either side takes any reply"
    assert not (word & text).catch_all, "one side narrows it"
    assert (text & anything()).catch_all
    assert not (~word).catch_all and not (~text).catch_all, "a negation is never a catch-all"


def test_bare_predicates_compose_and_route_wraps_them() -> None:
    from flows.toolkit import Matcher, keyword, route

    def is_long(m: Inbound) -> bool:
        return len(m.text) > 10

    either = is_long | keyword("hi")
    assert isinstance(either, Matcher) and either.label == "? or hi"
    assert either(Inbound(text="hi")) and either(Inbound(text="a long message"))
    both = keyword("hi") & is_long
    assert both.label == "hi and ?" and not both(Inbound(text="hi"))
    wrapped = route(is_long, lambda m, d: Step(END), to=END)
    assert isinstance(wrapped.matcher, Matcher) and wrapped.label == "" and not wrapped.matcher.catch_all
    assert feedback.flow.states[RATING][0].matcher(Inbound(text="4"))


def test_every_matcher_constructor_returns_a_matcher() -> None:
    from flows.toolkit import (Matcher, any_of, any_text, anything, button, choice, keyword, location, media,
                               number)

    built = [keyword("a"), button("B"), button(), number(1, 5), choice("x", "y"), any_text(), media(),
             media("image/"), location(), anything(), any_of(keyword("a"), button("B"))]
    assert all(isinstance(m, Matcher) for m in built)
    assert [m.label for m in built] == ["a", "button B", "any button", "1-5", "x|y", "text", "media",
                                        "media image/", "location", "anything", "a or button B"]
    assert any_of(keyword("a"))(Inbound(text="a"))


def test_appointment_answers_are_compositions() -> None:
    assert appointment.CONFIRM.label == ("button CONFIRM or 1|confirm|confirmed|yes|y|ok|okay"
                                         "|sim|confirmar|confirmo|confirmado")
    assert not appointment.CONFIRM.catch_all
    assert appointment.CANCEL(btn("CANCEL", "Cancel appointment")) and appointment.CANCEL(Inbound(text="3"))


# --- flows check themselves -------------------------------------------------------------------

def _end(message: Inbound, data: dict) -> Step:
    return Step(END, data=data, outcome={})


def _tiny(**overrides: Any) -> Flow:
    """A two-state flow to break in one place at a time."""
    from flows.toolkit import anything, keyword, route

    fields: dict[str, Any] = dict(
        name="tiny",
        states={"asking": (route(keyword("done"), _end, to=END),),
                "waiting": (route(anything(), _end, to=END),)},
        entry_points=(route(keyword("go"), lambda m, d: Step("asking"), to="asking"),),
        start=lambda variables: Step("asking"),
        start_to=("asking",),
    )
    return Flow(**{**fields, **overrides})


def test_a_valid_flow_builds() -> None:
    assert _tiny().handle(None, Inbound(text="go"), {}).state == "asking"


@pytest.mark.parametrize("overrides, named", [
    pytest.param("state", ["'tiny'", "'done'", "'askng'", "did you mean 'asking'"], id="typo-in-a-state"),
    pytest.param("entry", ["'tiny'", "entry point", "'go'", "'askin'"], id="typo-in-an-entry-point"),
    pytest.param("fallback", ["'tiny'", "fallback", "'anything'", "'Waiting'"], id="typo-in-a-fallback"),
    pytest.param({"start_to": ("asked",)}, ["'tiny'", "start_to", "'asked'"], id="typo-in-start_to"),
    pytest.param({"timeout": timedelta(hours=1), "timeout_to": ("ended",)}, ["'tiny'", "timeout_to", "'ended'"],
                 id="typo-in-timeout_to"),
    pytest.param("no-target", ["'tiny'", "'done'", "declares no target"], id="route-without-target"),
    pytest.param({"start": None}, ["'tiny'", "start_to", "no start"], id="start_to-without-start"),
    pytest.param({"timeout_to": (END,)}, ["'tiny'", "no timeout"], id="timeout_to-without-timeout"),
])
def test_a_bad_declaration_fails_when_the_flow_is_built(overrides: Any, named: list[str]) -> None:
    from flows.toolkit import anything, keyword, route

    if overrides == "state":
        overrides = {"states": {"asking": (route(keyword("done"), _end, to="askng"),), "waiting": ()}}
    elif overrides == "entry":
        overrides = {"entry_points": (route(keyword("go"), _end, to="askin"),)}
    elif overrides == "fallback":
        overrides = {"fallbacks": (route(anything(), _end, to=("Waiting", END)),)}
    elif overrides == "no-target":
        overrides = {"states": {"asking": (route(keyword("done"), _end),)}}
    with pytest.raises(ValueError) as raised:
        _tiny(**overrides)
    for name in named:
        assert name in str(raised.value)


def test_a_handler_going_outside_its_routes_targets_fails_when_it_runs() -> None:
    from flows.toolkit import UndeclaredTarget, UnknownState, keyword, route

    strays = _tiny(states={"asking": (route(keyword("done"), lambda m, d: Step("waiting"), to=END),),
                           "waiting": ()})
    with pytest.raises(UndeclaredTarget) as raised:
        strays.handle("asking", Inbound(text="done"), {})
    assert isinstance(raised.value, UnknownState), "the engine's UnknownState handling still catches it"
    for name in ("'tiny'", "'done'", "'asking'", "'waiting'", "END"):
        assert name in str(raised.value)
    # A state the flow does not have at all is still an UnknownState.
    lost = _tiny(states={"asking": (route(keyword("done"), lambda m, d: Step("nowhere"), to=END),)})
    with pytest.raises(UnknownState, match="'nowhere'"):
        lost.handle("asking", Inbound(text="done"), {})
    with pytest.raises(TypeError, match="not a Step"):
        _tiny(states={"asking": (route(keyword("done"), lambda m, d: None, to=END),)}).handle(
            "asking", Inbound(text="done"), {})


def test_start_and_timeout_are_checked_against_their_declared_targets() -> None:
    from flows.toolkit import UndeclaredTarget

    with pytest.raises(UndeclaredTarget, match="start"):
        _tiny(start=lambda variables: Step("waiting")).begin({})
    assert _tiny(start=lambda variables: Step("waiting"), start_to=()).begin({}).state == "waiting", \
        "no start_to declared: nothing to check against"
    assert _tiny(timeout=timedelta(hours=1)).expire({}).state == END, "the default timeout ends"
    with pytest.raises(UndeclaredTarget, match="on_timeout"):
        _tiny(timeout=timedelta(hours=1), on_timeout=lambda data: Step("asking")).expire({})
    with pytest.raises(UndeclaredTarget, match="on_timeout"):
        _tiny(timeout=timedelta(hours=1), on_timeout=lambda data: Step("asking"), timeout_to=("waiting",)).expire({})
    assert _tiny(timeout=timedelta(hours=1), on_timeout=lambda data: Step("asking"),
                 timeout_to=("asking",)).expire({}).state == "asking"


# --- traits -----------------------------------------------------------------------------------

def test_traits_default_to_an_ordinary_flow() -> None:
    for flow in (appointment.flow, feedback.flow):
        assert not (flow.on_first_contact or flow.asks_consent or flow.yields_to_entry_points)
        assert flow.yield_outcome is None and flow.backend_may_start and flow.backend_can_start


def test_the_welcome_declares_its_traits() -> None:
    from flows import welcome

    flow = welcome.flow
    assert flow.on_first_contact and flow.asks_consent and flow.yields_to_entry_points
    assert flow.yield_outcome == {"consent": "no_answer"}
    assert flow.backend_may_start and flow.backend_can_start


def test_backend_can_start_needs_permission_and_a_start() -> None:
    assert _tiny().backend_can_start
    assert not _tiny(backend_may_start=False).backend_can_start
    assert not _tiny(start=None, start_to=()).backend_can_start


@pytest.mark.parametrize("overrides, named", [
    pytest.param({"on_first_contact": True, "start": None, "start_to": ()}, "on_first_contact needs start",
                 id="first-contact-without-start"),
    pytest.param({"yield_outcome": {"consent": "no_answer"}}, "yield_outcome", id="yield-outcome-without-yielding"),
])
def test_contradictory_traits_fail_when_the_flow_is_built(overrides: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        _tiny(**overrides)


def test_a_registry_has_at_most_one_first_contact_flow() -> None:
    from flows import validated

    one = _tiny(name="one", on_first_contact=True)
    assert list(validated([one, _tiny(name="two")])) == ["one", "two"]
    with pytest.raises(ValueError, match="first contact.*one, two"):
        validated([one, _tiny(name="two", on_first_contact=True)])
    with pytest.raises(ValueError, match="'one'"):
        validated([one, _tiny(name="one")])


def test_the_registry_is_checked_cached_and_read_only() -> None:
    from flows import registry

    flows = registry()
    assert registry() is flows, "built once: it is called for every message"
    assert list(flows) == ["welcome", "appointment", "feedback"]
    assert [f.name for f in flows.values() if f.on_first_contact] == ["welcome"]
    with pytest.raises(TypeError):
        flows["welcome"] = feedback.flow  # type: ignore[index]


def test_the_registry_and_the_welcome_are_pure_code() -> None:
    """Like test_flows_are_pure_code, for the registry, the welcome and the diagrams."""
    code = ("import sys, flows, flows.welcome, flows.diagram; flows.registry(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('flask', 'sqlalchemy', 'bot')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
