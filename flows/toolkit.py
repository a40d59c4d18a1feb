"""The flow toolkit: conversations declared as data, in the shape of python-telegram-bot's
ConversationHandler (entry points, states of routes, fallbacks, a timeout).

A handler is a plain function of (inbound message, conversation data) that returns a Step: the
next state (or END), the replies to send (template names + variables) and the new data. Nothing
here imports Flask or SQLAlchemy, so every flow is testable as pure code; the engine in
`bot/conversations/engine.py` loads and stores the conversation and sends the replies.
"""
from __future__ import annotations

import difflib
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
    #: Hand the contact over to a person, with this reason (the conversation ends; the bot is
    #: silent until the handoff ends). Tell the user in `replies`.
    handoff: str | None = None


#: A bare predicate: what `Matcher` wraps, and what `route()` and the operators also accept.
Predicate = Callable[[Inbound], bool]
Handler = Callable[[Inbound, dict], Step]
TimeoutHandler = Callable[[dict], Step]
StartHandler = Callable[[dict], Step]

# Label operators. A chain of one operator reads flat ("a or b or c"); an `and` inside an `or` (or
# the reverse) is parenthesized either way, so a reader of a diagram needs no precedence rules.
_OR, _AND, _NOT = "or", "and", "not"


@dataclass(frozen=True)
class Matcher:
    """Whether a route takes a message: a predicate with a diagram label.

    Call it (`m(message) -> bool`) and compose it: `a | b` ("a or b"), `a & b` ("a and b"),
    `~a` ("not a"). `catch_all` marks a matcher that takes any reply (any text, anything): such a
    route is no evidence that the state expects a particular message (see `Flow.expects`).
    """

    predicate: Predicate
    label: str = ""
    catch_all: bool = False
    #: The operator that built this matcher (`_OR`, `_AND`, `_NOT`; "" for a leaf), so a nested
    #: composition is parenthesized in labels only where it must be: "a or (b and c)".
    _op: str = field(default="", repr=False, compare=False)

    def __call__(self, message: Inbound) -> bool:
        return bool(self.predicate(message))

    @classmethod
    def of(cls, matcher: "Matcher | Predicate", label: str = "") -> "Matcher":
        """`matcher` itself if it is a Matcher, else the bare predicate wrapped, labelled `label`."""
        return matcher if isinstance(matcher, Matcher) else cls(matcher, label)

    def __or__(self, other: "Matcher | Predicate") -> "Matcher":
        """Either matches; a catch-all when either is one (it takes any reply through that side)."""
        left, right = self, Matcher.of(other)
        return Matcher(lambda m: left(m) or right(m), _join(_OR, left, right),
                       left.catch_all or right.catch_all, _OR)

    def __ror__(self, other: Predicate) -> "Matcher":
        return Matcher.of(other) | self

    def __and__(self, other: "Matcher | Predicate") -> "Matcher":
        """Both match; a catch-all only when both are (otherwise one side narrows it)."""
        left, right = self, Matcher.of(other)
        return Matcher(lambda m: left(m) and right(m), _join(_AND, left, right),
                       left.catch_all and right.catch_all, _AND)

    def __rand__(self, other: Predicate) -> "Matcher":
        return Matcher.of(other) & self

    def __invert__(self) -> "Matcher":
        """Does not match; never a catch-all ("not media" says what it excludes, not "any reply")."""
        inner = self
        return Matcher(lambda m: not inner(m), f"{_NOT} {_operand(_NOT, inner)}", False, _NOT)


def _operand(op: str, part: Matcher) -> str:
    """`part`'s label as an operand of `op`: parenthesized when it is the other binary operator
    ("(a or b) and c"); "?" for an unlabelled predicate."""
    label = part.label or "?"
    mixed = part._op in (_OR, _AND) and part._op != op
    return f"({label})" if mixed else label


def _join(op: str, left: Matcher, right: Matcher) -> str:
    return f"{_operand(op, left)} {op} {_operand(op, right)}"


@dataclass(frozen=True)
class Route:
    matcher: Matcher
    handler: Handler
    #: A short label for diagrams (`flask flows graph`).
    label: str = ""
    #: The states the handler may go to (END included): drawn in diagrams, checked when the flow
    #: is built (each must exist) and when the handler runs (it must go to one of them).
    to: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Built directly (not through route()), a bare predicate or a single target still works.
        if not isinstance(self.matcher, Matcher):
            object.__setattr__(self, "matcher", Matcher.of(self.matcher))
        if isinstance(self.to, str):
            object.__setattr__(self, "to", (self.to,))
        else:
            object.__setattr__(self, "to", tuple(self.to))

    @property
    def name(self) -> str:
        """How error messages name the route: its label, else its handler's name."""
        return self.label or getattr(self.handler, "__name__", repr(self.handler))


def route(matcher: Matcher | Predicate, handler: Handler, *, to: tuple[str, ...] | str = (),
          label: str | None = None) -> Route:
    """A route: when `matcher` accepts the message, `handler` runs (and goes to one of `to`).

    `matcher` may be a bare predicate; `label` defaults to the matcher's.
    """
    wrapped = Matcher.of(matcher)
    targets = (to,) if isinstance(to, str) else tuple(to)
    return Route(wrapped, handler, label if label is not None else wrapped.label, targets)


class UnknownState(LookupError):
    """A stored state that the flow no longer declares (the flow changed since), or a handler
    that went to a state the flow does not have."""


class UndeclaredTarget(UnknownState):
    """A handler went to an existing state that its route (or `start_to` / `timeout_to`) does not
    declare: the diagram would not show that move."""


@dataclass(frozen=True)
class Flow:
    """A conversation as a state machine.

    - `entry_points`: routes that start the flow from a user's message (no conversation yet);
    - `start`: starts it from the backend (POST /notify with "flow"), given its variables;
    - `states`: state name -> routes tried in order; then `fallbacks`;
    - `timeout` / `on_timeout`: an idle conversation is expired by a periodic sweep, which runs
      `on_timeout(data)` (its replies may fall outside the 24-hour window: give them a
      `content_template`).
    - `start_to` / `timeout_to`: the states `start` / `on_timeout` may go to (`timeout_to`
      defaults to END).

    Every target a route, `start_to` or `timeout_to` declares must be a state or END, or building
    the flow raises ValueError (a typo fails at import); a handler that goes anywhere its route
    does not declare raises UndeclaredTarget, so the diagram drawn from them never lies.

    The traits (`on_first_contact` ... `backend_may_start`) tell the engine how to treat the
    flow, so it never special-cases a flow by name.
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
    #: Runs on a contact's first message: when their consent is unknown and this flow never ran
    #: for them, the engine begins it (`start`, with {"name": their profile name}) if no entry
    #: point took the message. Needs `start`; at most one flow of the registry may have it.
    on_first_contact: bool = False
    #: The flow is an opt-in question. While it is open a YES-like word is always an opt-in (never
    #: an answer to it), and an opt-in ends it with outcome {"consent": "opted_in"}; a step whose
    #: outcome is {"consent": "declined"} is recorded as a decline in the consent ledger; an
    #: opted-in contact is never put in it.
    asks_consent: bool = False
    #: While it is open, a message that another flow's entry point takes (e.g. FEEDBACK) ends it
    #: with `yield_outcome` and starts that flow instead, unless a route of its current state
    #: expects the message (`expects`): a question aside must not swallow a request.
    yields_to_entry_points: bool = False
    #: The outcome stored when the flow yields to an entry point (None: no outcome).
    yield_outcome: Mapping[str, Any] | None = None
    #: Whether POST /notify may start it (it also needs `start`: see `backend_can_start`).
    backend_may_start: bool = True

    def __post_init__(self) -> None:
        """Check the declaration, so a mistake fails when the flow module is imported."""
        problems: list[str] = []
        if END in self.states:
            problems.append(f"{END!r} is the end, not a state")
        for where, routes in [("entry point", self.entry_points), ("fallback", self.fallbacks),
                              *((f"state {state!r}", routes) for state, routes in self.states.items())]:
            for each in routes:
                if not isinstance(each, Route):
                    problems.append(f"{where}: {each!r} is not a Route (build it with route())")
                    continue
                if not each.to:
                    problems.append(f"{where}: route {each.name!r} declares no target (give it to=...)")
                problems += [f"{where}: route {each.name!r} goes to {self._unknown(target)}"
                             for target in each.to if not self._known(target)]
        problems += [f"start_to goes to {self._unknown(t)}" for t in self.start_to if not self._known(t)]
        problems += [f"timeout_to goes to {self._unknown(t)}" for t in self.timeout_to if not self._known(t)]
        if self.start_to and self.start is None:
            problems.append("start_to is declared but there is no start")
        if (self.on_timeout is not None or self.timeout_to) and self.timeout is None:
            problems.append("on_timeout / timeout_to are declared but there is no timeout")
        if self.on_first_contact and self.start is None:
            problems.append("on_first_contact needs start (the engine begins the flow with it)")
        if self.yield_outcome is not None and not self.yields_to_entry_points:
            problems.append("yield_outcome is set but the flow does not yield to entry points")
        if problems:
            raise ValueError(f"flow {self.name!r}: " + "; ".join(problems))

    def _known(self, target: str) -> bool:
        return target == END or target in self.states

    def _unknown(self, target: str) -> str:
        """A bad target, named with a guess at what was meant."""
        close = difflib.get_close_matches(str(target), [*self.states, END], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown state {target!r}{hint}; states: {', '.join(self.states) or 'none'}, or END"

    @property
    def backend_can_start(self) -> bool:
        """Whether POST /notify may start this flow: allowed, and it has a `start`."""
        return self.backend_may_start and self.start is not None

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
        return any(not r.matcher.catch_all and r.matcher(message) for r in self.states.get(state, ()))

    def handle(self, state: str | None, message: Inbound, data: Mapping[str, Any]) -> Step | None:
        """Run the first route that matches; None when nothing does.

        Raises UndeclaredTarget when the handler goes to a state its route does not declare.
        """
        for candidate in self.routes_for(state):
            if candidate.matcher(message):
                step = candidate.handler(message, dict(data))
                where = f"route {candidate.name!r}" + (f" in state {state!r}" if state else " (entry point)")
                self._check(step, candidate.to, where)
                return step
        return None

    def begin(self, variables: Mapping[str, Any]) -> Step:
        """Start from the backend with `variables` (checked against `start_to` if declared)."""
        if self.start is None:
            raise ValueError(f"flow {self.name!r} cannot be started by the backend")
        step = self.start(dict(variables))
        self._check(step, self.start_to or None, "start")
        return step

    def expire(self, data: Mapping[str, Any]) -> Step:
        """What happens when the conversation times out (default: end silently)."""
        step = self.on_timeout(dict(data)) if self.on_timeout else Step(END, data=dict(data))
        # The diagram draws the timeout to `timeout_to`, or to END when it declares none.
        self._check(step, self.timeout_to or (END,), "on_timeout")
        return step

    def _check(self, step: Step, allowed: tuple[str, ...] | None, where: str) -> None:
        """`step` is a Step going to a state of the flow, and one of `allowed` (None: any)."""
        if not isinstance(step, Step):
            raise TypeError(f"a handler of flow {self.name!r} ({where}) returned {step!r}, not a Step")
        if step.state != END and step.state not in self.states:
            raise UnknownState(f"a handler of flow {self.name!r} ({where}) went to undeclared state "
                               f"{step.state!r}")
        if allowed is not None and step.state not in allowed:
            raise UndeclaredTarget(f"a handler of flow {self.name!r} ({where}) went to {step.state!r}, "
                                   f"which it does not declare (declared: {', '.join(allowed)})")


# --- matchers -------------------------------------------------------------------------------

_PUNCTUATION = re.compile(r"[\W_]+", re.UNICODE)


def normalize(text: str | None) -> str:
    """Case-fold, drop punctuation and emoji, collapse spaces: ' Stop!! ' -> 'stop'."""
    if not text:
        return ""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_PUNCTUATION.sub(" ", text).split())


def keyword(*words: str) -> Matcher:
    """The whole message (or a pressed button's payload/label) is one of `words`."""
    wanted = {normalize(w) for w in words} - {""}  # an empty keyword would match every media message
    return Matcher(
        lambda m: m.words in wanted or normalize(m.button_payload) in wanted or normalize(m.button_text) in wanted,
        "|".join(words),
    )


def button(*payloads: str) -> Matcher:
    """A WhatsApp quick-reply button was pressed (any, or one of `payloads`)."""
    wanted = {normalize(p) for p in payloads} - {""}
    return Matcher(
        lambda m: m.button_payload is not None and (not wanted or normalize(m.button_payload) in wanted),
        "button " + "|".join(payloads) if payloads else "any button",
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
    return Matcher(match, f"{minimum}-{maximum}")


def choice(*options: str) -> Matcher:
    """One of `options`, typed or pressed; same as keyword, named for menus."""
    return keyword(*options)


def any_text() -> Matcher:
    """Any message with some text (a catch-all: it takes any reply in words)."""
    return Matcher(lambda m: bool(m.text.strip()), "text", catch_all=True)


def media(content_type_prefix: str = "") -> Matcher:
    """A message carrying media (optionally of a type, e.g. 'image/')."""
    return Matcher(
        lambda m: any((item.content_type or "").startswith(content_type_prefix) for item in m.media),
        f"media {content_type_prefix}".strip(),
    )


def location() -> Matcher:
    """A shared location."""
    return Matcher(lambda m: m.location is not None, "location")


def anything() -> Matcher:
    """Every message (for fallbacks; a catch-all)."""
    return Matcher(lambda m: True, "anything", catch_all=True)


def any_of(*matchers: Matcher | Predicate) -> Matcher:
    """Any of several matchers: `a | b | ...` (kept for existing callers; prefer `|`)."""
    if not matchers:
        raise ValueError("any_of needs at least one matcher")
    combined = Matcher.of(matchers[0])
    for each in matchers[1:]:
        combined = combined | each
    return combined
