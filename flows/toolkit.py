"""The flow toolkit: conversations declared as data, in the shape of python-telegram-bot's
ConversationHandler (entry points, states of routes, fallbacks, a timeout).

A handler is a plain function of (inbound message, conversation data) that returns a Step: the
next state (or END), the replies to send (template names + variables) and the new data. Nothing
here imports Flask or SQLAlchemy, so every flow is testable as pure code; the engine in
`bot/conversations/engine.py` loads and stores the conversation and sends the replies.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Mapping

#: The state a handler returns to end the conversation.
END = "END"



#: Twilio sends at most 10 media items; a huge NumMedia must not become a huge loop.
MAX_MEDIA = 10

@dataclass(frozen=True)
class Media:
    url: str
    content_type: str | None = None


@dataclass(frozen=True)
class Location:
    latitude: float
    longitude: float
    address: str | None = None
    label: str | None = None


@dataclass(frozen=True)
class Inbound:
    """What a flow sees of one WhatsApp message."""

    text: str = ""
    button_payload: str | None = None
    button_text: str | None = None
    media: tuple[Media, ...] = ()
    location: Location | None = None
    profile_name: str | None = None
    wa_id: str | None = None
    message_sid: str | None = None

    @classmethod
    def from_twilio(cls, form: Mapping[str, Any]) -> "Inbound":
        """Build from Twilio's webhook fields (Body, ButtonPayload, MediaUrlN, Latitude, ...)."""
        try:
            count = int(form.get("NumMedia") or 0)
        except (TypeError, ValueError):
            count = 0
        media = tuple(
            Media(str(form[f"MediaUrl{i}"]), form.get(f"MediaContentType{i}"))
            for i in range(min(max(count, 0), MAX_MEDIA)) if form.get(f"MediaUrl{i}")
        )
        location = None
        try:
            if form.get("Latitude") not in (None, "") and form.get("Longitude") not in (None, ""):
                location = Location(float(form["Latitude"]), float(form["Longitude"]),
                                    form.get("Address") or None, form.get("Label") or None)
        except (TypeError, ValueError):
            location = None
        return cls(
            text=str(form.get("Body") or ""),
            button_payload=form.get("ButtonPayload") or None,
            button_text=form.get("ButtonText") or None,
            media=media,
            location=location,
            profile_name=form.get("ProfileName") or None,
            wa_id=form.get("WaId") or None,
            message_sid=form.get("MessageSid") or None,
        )

    @property
    def words(self) -> str:
        """The text as keywords are compared: case-folded, trimmed, punctuation dropped."""
        return normalize(self.text)

    @property
    def answer(self) -> str:
        """What the user chose: a button's payload if they pressed one, else their words."""
        return normalize(self.button_payload) if self.button_payload else self.words


@dataclass(frozen=True)
class Reply:
    """One message to send: `template` is a path under templates/ without '.txt'.

    Outside WhatsApp's 24-hour window free-form text is not allowed; `content_template` names an
    approved template (a key of TWILIO_CONTENT_SIDS) to send instead, with `content_variables`.
    Without one, the engine records the reply as skipped instead of sending it.
    """

    template: str
    variables: Mapping[str, Any] = field(default_factory=dict)
    content_template: str | None = None
    content_variables: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Step:
    """What a handler decides: next state, replies, new data, and an outcome for the backend."""

    state: str
    replies: tuple[Reply, ...] = ()
    data: Mapping[str, Any] = field(default_factory=dict)
    #: Stored on the conversation and readable through the API (e.g. {"answer": "confirmed"}).
    outcome: Mapping[str, Any] | None = None


Matcher = Callable[[Inbound], bool]
Handler = Callable[[Inbound, dict], Step]
TimeoutHandler = Callable[[dict], Step]
StartHandler = Callable[[dict], Step]


@dataclass(frozen=True)
class Route:
    matcher: Matcher
    handler: Handler
    #: A short label for diagrams (`flask flows graph`).
    label: str = ""
    #: The states the handler may go to (END included), for diagrams; not enforced at run time.
    to: tuple[str, ...] = ()


def route(matcher: Matcher, handler: Handler, *, to: tuple[str, ...] | str = (), label: str | None = None) -> Route:
    """A route: when `matcher` accepts the message, `handler` runs (and goes to one of `to`)."""
    targets = (to,) if isinstance(to, str) else tuple(to)
    return Route(matcher, handler, label if label is not None else getattr(matcher, "label", ""), targets)


class UnknownState(LookupError):
    """A stored state that the flow no longer declares (the flow changed since)."""


@dataclass(frozen=True)
class Flow:
    """A conversation as a state machine.

    - `entry_points`: routes that start the flow from a user's message (no conversation yet);
    - `start`: starts it from the backend (POST /notify with "flow"), given its variables;
    - `states`: state name -> routes tried in order; then `fallbacks`;
    - `timeout` / `on_timeout`: an idle conversation is expired by a periodic sweep, which runs
      `on_timeout(data)` (its replies may fall outside the 24-hour window: give them a
      `content_template`).
    - `start_to` / `timeout_to`: for diagrams, the states `start` / `on_timeout` may go to.
    """

    name: str
    states: Mapping[str, tuple[Route, ...]]
    entry_points: tuple[Route, ...] = ()
    fallbacks: tuple[Route, ...] = ()
    start: StartHandler | None = None
    timeout: timedelta | None = None
    on_timeout: TimeoutHandler | None = None
    description: str = ""
    start_to: tuple[str, ...] = ()
    timeout_to: tuple[str, ...] = ()
    #: Variables `start` needs; POST /notify checks them before queueing (no flow code runs there).
    required_variables: tuple[str, ...] = ()
    #: The approved template (a TWILIO_CONTENT_SIDS name) `start`'s first message uses outside the
    #: 24-hour window; without it, the backend can start this flow only inside the window.
    start_content_template: str | None = None

    def routes_for(self, state: str | None) -> tuple[Route, ...]:
        """The routes to try in `state` (None: not started), fallbacks last."""
        if state is None:
            return self.entry_points
        if state not in self.states:
            raise UnknownState(f"flow {self.name!r} has no state {state!r}")
        return tuple(self.states[state]) + tuple(self.fallbacks)

    def expects(self, state: str, message: Inbound) -> bool:
        """Whether `state` has a route made for this message: one of the state's own routes,
        not a fallback, and not a catch-all (any text, anything) that would take any reply."""
        return any(not getattr(r.matcher, "catch_all", False) and r.matcher(message)
                   for r in self.states.get(state, ()))

    def handle(self, state: str | None, message: Inbound, data: Mapping[str, Any]) -> Step | None:
        """Run the first route that matches; None when nothing does."""
        for candidate in self.routes_for(state):
            if candidate.matcher(message):
                step = candidate.handler(message, dict(data))
                self._check(step)
                return step
        return None

    def begin(self, variables: Mapping[str, Any]) -> Step:
        """Start from the backend with `variables`."""
        if self.start is None:
            raise ValueError(f"flow {self.name!r} cannot be started by the backend")
        step = self.start(dict(variables))
        self._check(step)
        return step

    def expire(self, data: Mapping[str, Any]) -> Step:
        """What happens when the conversation times out (default: end silently)."""
        step = self.on_timeout(dict(data)) if self.on_timeout else Step(END, data=dict(data))
        self._check(step)
        return step

    def _check(self, step: Step) -> None:
        if not isinstance(step, Step):
            raise TypeError(f"a handler of flow {self.name!r} returned {step!r}, not a Step")
        if step.state != END and step.state not in self.states:
            raise UnknownState(f"a handler of flow {self.name!r} went to undeclared state {step.state!r}")


# --- matchers -------------------------------------------------------------------------------

_PUNCTUATION = re.compile(r"[\W_]+", re.UNICODE)


def normalize(text: str | None) -> str:
    """Case-fold, drop punctuation and emoji, collapse spaces: ' Stop!! ' -> 'stop'."""
    if not text:
        return ""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_PUNCTUATION.sub(" ", text).split())


def _labelled(label: str, fn: Matcher, *, catch_all: bool = False) -> Matcher:
    fn.label = label  # type: ignore[attr-defined]
    fn.catch_all = catch_all  # type: ignore[attr-defined]  # takes any reply: see Flow.expects
    return fn


def keyword(*words: str) -> Matcher:
    """The whole message (or a pressed button's payload/label) is one of `words`."""
    wanted = {normalize(w) for w in words} - {""}  # an empty keyword would match every media message
    return _labelled(
        "|".join(words),
        lambda m: m.words in wanted or normalize(m.button_payload) in wanted or normalize(m.button_text) in wanted,
    )


def button(*payloads: str) -> Matcher:
    """A WhatsApp quick-reply button was pressed (any, or one of `payloads`)."""
    wanted = {normalize(p) for p in payloads} - {""}
    return _labelled(
        "button " + "|".join(payloads) if payloads else "any button",
        lambda m: m.button_payload is not None and (not wanted or normalize(m.button_payload) in wanted),
    )


_NUMBER = re.compile(r"^#?\s*(\d{1,9})\s*[.!)]?$")


def parse_number(message: Inbound) -> int | None:
    """The whole message as a non-negative integer ('4', ' 4. ', '#4'), else None ('-1' too)."""
    raw = (message.button_payload or message.text or "").strip()
    found = _NUMBER.match(raw)
    return int(found.group(1)) if found else None


def number(minimum: int, maximum: int) -> Matcher:
    """A whole number from `minimum` to `maximum` (typed, or as a button payload)."""
    def match(m: Inbound) -> bool:
        value = parse_number(m)
        return value is not None and minimum <= value <= maximum
    return _labelled(f"{minimum}-{maximum}", match)


def choice(*options: str) -> Matcher:
    """One of `options`, typed or pressed; same as keyword, named for menus."""
    return keyword(*options)


def any_text() -> Matcher:
    """Any message with some text."""
    return _labelled("text", lambda m: bool(m.text.strip()), catch_all=True)


def media(content_type_prefix: str = "") -> Matcher:
    """A message carrying media (optionally of a type, e.g. 'image/')."""
    return _labelled(
        f"media {content_type_prefix}".strip(),
        lambda m: any((item.content_type or "").startswith(content_type_prefix) for item in m.media),
    )


def location() -> Matcher:
    """A shared location."""
    return _labelled("location", lambda m: m.location is not None)


def anything() -> Matcher:
    """Every message (for fallbacks)."""
    return _labelled("anything", lambda m: True, catch_all=True)


def any_of(*matchers: Matcher) -> Matcher:
    """Any of several matchers."""
    return _labelled(" or ".join(getattr(x, "label", "?") for x in matchers), lambda m: any(x(m) for x in matchers))
