"""Appointment reminder: the backend starts it, the user confirms, reschedules or cancels.

Started by POST /notify with {"flow": "appointment", "variables": {...}}:

- `date`, `time` (required): shown to the user as given ("Tue 14 May", "10:30");
- `name`, `place` (optional): greeting and address;
- `appointment_id` (optional): echoed in every outcome so the backend knows which booking it is.

The first message goes out as the approved template `appointment_reminder` (quick-reply buttons
with payloads CONFIRM, RESCHEDULE, CANCEL) when the contact is outside the 24-hour window. Users
may also type 1 / 2 / 3 or a word. A bare "cancel" never reaches this flow (it is a global
opt-out keyword), so the copy says "cancel appointment" or 3 instead.

Outcomes (always with `answer`, `appointment_id`, `date`, `time`):

- {"answer": "confirmed"} / {"answer": "cancelled"};
- {"answer": "reschedule", "requested_time": "<the user's words>"};
- {"answer": "no_answer", "reschedule_requested": bool}: three answers the flow did not understand;
- {"answer": "no_response", "reschedule_requested": bool}: silent for 24 hours.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any, Mapping

from flows.toolkit import END, Flow, Inbound, Reply, Step, any_text, anything, button, keyword, route

NAME = "appointment"

AWAITING_ANSWER = "awaiting_answer"
AWAITING_NEW_TIME = "awaiting_new_time"

#: The third answer the flow cannot understand ends it (a person takes over).
MAX_INVALID = 3
TIMEOUT = timedelta(hours=24)

REQUIRED_VARIABLES = ("date", "time")
OPTIONAL_TEXT_VARIABLES = ("name", "place")

# What the user may press or type. Buttons come from the approved template; typed words are
# compared after normalize() (case-folded, trimmed, punctuation dropped: "  Confirm! " -> "confirm").
# The copy asks for a number in every language (templates/appointment/<locale>/); the words of the
# shipped translations (pt-BR) are understood too, whatever the contact's locale.
CONFIRM = button("CONFIRM") | keyword("1", "confirm", "confirmed", "yes", "y", "ok", "okay",
                                      "sim", "confirmar", "confirmo", "confirmado")
RESCHEDULE = button("RESCHEDULE") | keyword("2", "reschedule", "change", "change it", "another time",
                                            "remarcar", "mudar")
# "cancel" alone is the engine's opt-out keyword and never gets here; "cancel appointment" does.
CANCEL = button("CANCEL") | keyword("3", "cancel appointment", "cancel my appointment", "cancelar",
                                    "cancelar consulta")
#: Diagram label of the catch-all routes.
REASK = f"re-ask, end after {MAX_INVALID}"



# --- start and timeout ------------------------------------------------------------------------

def start(variables: dict) -> Step:
    """Send the reminder and wait for an answer.

    Raises ValueError naming each missing required variable (`date`, `time`), or a variable of
    the wrong type; the API reports it as a 400.
    """
    data = _validated(variables)
    reminder = Reply(
        "appointment/reminder",
        _details(data),
        # Usually sent hours or days after the user last wrote: outside the 24-hour window.
        content_template="appointment_reminder",
        content_variables={"1": data["date"], "2": data["time"]},
    )
    return Step(AWAITING_ANSWER, replies=(reminder,), data=data)


def on_timeout(data: dict) -> Step:
    """No answer for 24 hours: end, tell the backend, and nudge the user (likely out of window)."""
    nudge = Reply(
        "appointment/no_response",
        _details(data),
        content_template="appointment_no_response",
        content_variables={"1": str(data.get("date", "")), "2": str(data.get("time", ""))},
    )
    outcome = _outcome(data, "no_response", reschedule_requested=bool(data.get("reschedule_requested")))
    return Step(END, replies=(nudge,), data=data, outcome=outcome)


# --- handlers ---------------------------------------------------------------------------------

def confirm(message: Inbound, data: dict) -> Step:
    """The user keeps the appointment."""
    return Step(END, replies=(Reply("appointment/confirmed", _details(data)),), data=data,
                outcome=_outcome(data, "confirmed"))


def cancel(message: Inbound, data: dict) -> Step:
    """The user cancels the appointment."""
    return Step(END, replies=(Reply("appointment/cancelled", _details(data)),), data=data,
                outcome=_outcome(data, "cancelled"))


def ask_new_time(message: Inbound, data: dict) -> Step:
    """The user wants another time: ask which one suits them (a fresh question, fresh re-asks)."""
    data = {**data, "invalid_answers": 0, "reschedule_requested": True}
    return Step(AWAITING_NEW_TIME, replies=(Reply("appointment/ask_new_time", _details(data)),), data=data)


def new_time_given(message: Inbound, data: dict) -> Step:
    """Any text is the requested time; a person (or the backend) checks it, not this flow."""
    requested = message.text.strip()
    return Step(END, replies=(Reply("appointment/reschedule_received", {"requested_time": requested}),),
                data=data, outcome=_outcome(data, "reschedule", requested_time=requested))


def reask_answer(message: Inbound, data: dict) -> Step:
    """Not one of the three answers: explain the choices again."""
    return _invalid(data, AWAITING_ANSWER, Reply("appointment/reask", _details(data)))


def reask_new_time(message: Inbound, data: dict) -> Step:
    """No text (a photo, a location, ...): ask for the time in words."""
    return _invalid(data, AWAITING_NEW_TIME, Reply("appointment/reask_new_time", {}))


# --- the flow ---------------------------------------------------------------------------------

flow = Flow(
    name=NAME,
    description="Reminds of an appointment; the user confirms, reschedules or cancels.",
    start=start,
    start_to=(AWAITING_ANSWER,),
    required_variables=REQUIRED_VARIABLES,
    start_content_template="appointment_reminder",
    states={
        AWAITING_ANSWER: (
            route(CONFIRM, confirm, to=END, label="CONFIRM, 1, confirm, yes, ok"),
            route(RESCHEDULE, ask_new_time, to=AWAITING_NEW_TIME, label="RESCHEDULE, 2, reschedule, change"),
            route(CANCEL, cancel, to=END, label="CANCEL, 3, cancel appointment"),
            route(anything(), reask_answer, to=(AWAITING_ANSWER, END), label=f"else ({REASK})"),
        ),
        AWAITING_NEW_TIME: (
            # A button of the reminder pressed now: they changed their mind. Buttons come first,
            # or any_text() would take the button's label for the requested time.
            route(button("CONFIRM"), confirm, to=END),
            route(button("CANCEL"), cancel, to=END),
            route(button("RESCHEDULE"), ask_new_time, to=AWAITING_NEW_TIME),
            route(any_text(), new_time_given, to=END),
            route(anything(), reask_new_time, to=(AWAITING_NEW_TIME, END), label=f"no text ({REASK})"),
        ),
    },
    timeout=TIMEOUT,
    on_timeout=on_timeout,
    timeout_to=(END,),
)


# --- helpers ----------------------------------------------------------------------------------

def _validated(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The conversation data: the backend's variables with date/time/name/place as clean text."""
    data = dict(variables)
    missing = [key for key in REQUIRED_VARIABLES if _text(variables.get(key), key) is None]
    if missing:
        raise ValueError(f"appointment needs variable{'s' if len(missing) > 1 else ''} "
                         + ", ".join(repr(key) for key in missing))
    for key in REQUIRED_VARIABLES + OPTIONAL_TEXT_VARIABLES:
        data[key] = _text(variables.get(key), key)
    appointment_id = variables.get("appointment_id")
    if appointment_id is not None and (isinstance(appointment_id, bool)
                                       or not isinstance(appointment_id, (str, int, float))):
        raise ValueError("variable 'appointment_id' must be a string or a number")
    data["appointment_id"] = appointment_id
    data["invalid_answers"] = 0
    data["reschedule_requested"] = False
    return data


def _text(value: Any, key: str) -> str | None:
    """A variable as trimmed text; None when absent or blank. Numbers are accepted (the API does)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"variable {key!r} must be a string or a number")
    return str(value).strip() or None


def _details(data: Mapping[str, Any]) -> dict[str, Any]:
    """The variables every appointment template may use (optional ones as None, never missing)."""
    return {"name": data.get("name"), "date": data.get("date"), "time": data.get("time"),
            "place": data.get("place")}


def _outcome(data: Mapping[str, Any], answer: str, **extra: Any) -> dict[str, Any]:
    return {"answer": answer, "appointment_id": data.get("appointment_id"),
            "date": data.get("date"), "time": data.get("time"), **extra}


def _invalid(data: dict, state: str, reask: Reply) -> Step:
    """Count a misunderstood answer; re-ask, or give up on the third and hand over to a person."""
    count = int(data.get("invalid_answers", 0)) + 1
    data = {**data, "invalid_answers": count}
    if count >= MAX_INVALID:
        return Step(END, replies=(Reply("appointment/no_answer", _details(data)),), data=data,
                    outcome=_outcome(data, "no_answer",
                                     reschedule_requested=bool(data.get("reschedule_requested"))))
    return Step(state, replies=(reask,), data=data)
