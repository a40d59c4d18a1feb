"""The backend's API: POST /notify to send, GET /messages/<id> to see what happened.

POST /notify is a hot path (issue 17): a message to a number is one statement on PostgreSQL
(the contact's upsert, the refusal checks, the message row and its Idempotency-Key in CTEs) and
one commit, with statements built once and no ORM unit of work; its answer is built from the
values it wrote, not read back (bench/THROUGHPUT.md, "The web's hot path").
"""
from __future__ import annotations

import functools
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import sqlalchemy as sa
from flask import Blueprint, Response, abort, current_app, jsonify, request, url_for
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import selectinload

from bot import locales
from bot.clock import isoformat, utcnow
from bot.delivery import events, outbox
from bot.delivery.holding import MAX_SCHEDULE_AHEAD, QuietHours, hold_until, parse_quiet_hours
from bot.contacts import (FACTS, contact_by_phone_cte, get_or_create_contact, new_contact_statement, opt_out_waiting,
                          opt_out_waiting_clause)
from bot.conversations.handoff import in_handoff
from bot.conversations.users import UserConflict, upsert_user
from bot.delivery import routing
from bot.delivery.routing import Content, Unusable, template_copy
from bot.locales import Copy
from bot.extensions import db
from bot.models import (Contact, Conversation, EmailEvent, IdempotencyKey, Message, StatusEvent, hold_reason,
                        is_public_id, new_id)
from bot.channels.email.copy import email_templates
from bot.http.schemas import InvalidRequest, NotifyRequest, parse_notify
from bot.channels.whatsapp.whatsapp import SESSION_WINDOW, within_window
from bot.vocabulary import Channel, Consent, ConversationStatus, Direction, IdempotentKind, Kind, MessageStatus, StartedBy
from bot.http.auth import require_api_token
from flows import registry

bp = Blueprint("notify", __name__)

MAX_IDEMPOTENCY_KEY = 255
#: A send_at this far in the past is taken as "now" (clocks differ a little), not refused.
SEND_AT_SKEW = timedelta(minutes=1)


def read_json_body() -> Any:
    """The request's JSON, or None when it does not parse (including absurdly deep nesting)."""
    try:
        return request.get_json(silent=True)
    except RecursionError:
        return None


def idempotency_key() -> str | None:
    """The request's `Idempotency-Key`, stripped; None without one. Raises InvalidRequest for an
    empty or overlong key. One rule for /notify and /broadcasts (one key space)."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > MAX_IDEMPOTENCY_KEY:
        raise InvalidRequest(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    return key


def accepted_response(response: Response, url: str, replayed: bool) -> Response:
    """`response` as a 202 naming where to read what was accepted (`Location`), marked
    `Idempotent-Replayed` when it repeats the first answer for a reused key."""
    response.status_code = 202
    response.headers["Location"] = url
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _error(status: int, message: str, **extra: Any):
    return jsonify(error=message, **extra), status


def _accepted(message: Message, replayed: bool = False):
    return _accepted_as(message.id, message.status, message.channel, message.contact.user_id,
                        message.contact.address_on(message.channel), message.created_at, replayed,
                        send_at=message.send_at, held_until=message.not_before if message.is_held else None,
                        locale=message.locale)


def _accepted_as(message_id: str, status: str, channel: str, user_id: str | None, to: str | None,
                 created_at: datetime, replayed: bool = False, *, send_at: datetime | None = None,
                 held_until: datetime | None = None, locale: str | None = None):
    """202 for a message, from its values (a new one's answer reads nothing back)."""
    url = url_for("notify.get_message", message_id=message_id)
    response = jsonify(id=message_id, status=status, channel=channel, user_id=user_id, to=to,
                       created_at=isoformat(created_at), url=url, send_at=isoformat(send_at),
                       held_until=isoformat(held_until), held_reason=hold_reason(send_at, held_until), locale=locale)
    return accepted_response(response, url, replayed)


def _conversation_accepted(conversation: Conversation, replayed: bool = False):
    url = url_for("contacts_api.get_conversation", conversation_id=conversation.id)
    shown = conversation.to_dict()
    response = jsonify(
        id=conversation.id,
        status=conversation.status,
        to=conversation.contact.phone,
        flow=conversation.flow,
        created_at=shown["started_at"],
        url=url,
        send_at=shown["send_at"], held_until=shown["held_until"], held_reason=shown["held_reason"],
    )
    return accepted_response(response, url, replayed)


def _replay(key: str, fingerprint: str):
    """The first answer for a reused Idempotency-Key, a 422 if the payload differs, or None.

    One key space for messages and flows (`IdempotencyKey`): a key first used for a flow and
    then for a message (or the other way round) is a different payload."""
    used = db.session.get(IdempotencyKey, key)
    if used is None:
        return None
    if used.request_hash != fingerprint:
        return _error(422, "this Idempotency-Key was already used with a different payload")
    if used.kind == IdempotentKind.CONVERSATION:
        conversation = db.session.scalar(
            sa.select(Conversation).options(selectinload(Conversation.contact)).where(Conversation.id == used.target_id))
        return _conversation_accepted(conversation, replayed=True)
    message = db.session.scalar(
        sa.select(Message).options(selectinload(Message.contact)).where(Message.id == used.target_id))
    return _accepted(message, replayed=True)


@bp.post("/notify")
@require_api_token
def notify():
    """Queue a WhatsApp message for a backend; answers 202 with the message id."""
    if not request.is_json:
        return _error(415, "Content-Type must be application/json")
    payload = read_json_body()
    if payload is None:
        return _error(400, "the body is not valid JSON")
    try:
        notification = parse_notify(payload, current_app.config["TWILIO_CONTENT_SIDS"], registry(),
                                    email_templates())
    except InvalidRequest as exc:
        return _error(400, str(exc))

    try:
        key = idempotency_key()
    except InvalidRequest as exc:
        return _error(400, str(exc))
    if key is not None:
        replay = _replay(key, notification.fingerprint())
        if replay is not None:
            return replay

    if notification.send_at is not None:
        refusal = _schedule_refusal(notification.send_at_utc, utcnow())
        if refusal is not None:
            return refusal
    if notification.user_id is not None:
        return _notify_user(notification, key)
    if notification.flow is None:
        return _notify_number(notification, key)
    contact = get_or_create_contact(notification.to)
    if contact.consent == Consent.OPTED_OUT or opt_out_waiting(contact.id):
        db.session.commit()
        return _opted_out()
    return _start_flow(notification, contact, key)


def _schedule_refusal(send_at: datetime, now: datetime):
    """400 for a send_at in the past (beyond a minute of clock skew) or too far ahead."""
    if send_at < now - SEND_AT_SKEW:
        return _error(400, f"'send_at' is in the past ({isoformat(send_at)}; now is {isoformat(now)})")
    if send_at > now + MAX_SCHEDULE_AHEAD:
        return _error(400, f"'send_at' is more than {MAX_SCHEDULE_AHEAD.days} days ahead ({isoformat(send_at)})")
    return None


@functools.cache
def _quiet_hours(text: str) -> QuietHours | None:
    return parse_quiet_hours(text)


def _quiet_hours_of(notification: NotifyRequest) -> QuietHours | None:
    """This request's quiet hours: its own, or QUIET_HOURS. None for an agent's message: a person
    answering in a conversation is never held (nor are the bot's replies, which never come here)."""
    if notification.agent:
        return None
    text = notification.quiet_hours if notification.quiet_hours is not None else current_app.config["QUIET_HOURS"]
    return _quiet_hours(text)


def _hold(notification: NotifyRequest, timezone_name: str | None, now: datetime) -> datetime | None:
    """Until when the message waits in the database (None: it leaves now): its send_at, pushed
    past the quiet hours in the user's own timezone (bot/delivery/holding.py; invariant 15)."""
    return hold_until(now, notification.send_at_utc, _quiet_hours_of(notification), timezone_name,
                      current_app.config["DEFAULT_TIMEZONE"])


@functools.cache
def _phone_timezone_statement() -> sa.Select:
    return sa.select(Contact.timezone).where(Contact.phone == sa.bindparam("phone"))


def _report_held(params: dict[str, Any], contact_id: int, user_id: str | None, to: str | None) -> None:
    """message.held, in the transaction that stores the held message (invariant 12)."""
    events.message_held(params["message_id"], contact_id=contact_id, channel=params["channel"], kind=params["kind"],
                        to=to, user_id=user_id, held_until=params["not_before"],
                        reason=hold_reason(params["send_at"], params["not_before"]), send_at=params["send_at"],
                        metadata=params["metadata"], locale=params["locale"])


def send_as_agent(phone: str, body: str, agent: str) -> tuple[int, dict[str, Any]]:
    """An agent's free-form reply to a number, through exactly the path of `POST /notify` with
    `"agent"` (the dashboard's handoff inbox uses it): the same validation, refusals (409 opted
    out, 422 outside the window) and outbox. Returns the answer's status and JSON."""
    try:
        notification = parse_notify({"to": phone, "body": body, "agent": agent},
                                    current_app.config["TWILIO_CONTENT_SIDS"], registry(), email_templates())
    except InvalidRequest as exc:
        return 400, {"error": str(exc)}
    answer = _notify_number(notification, None)
    response, status = answer if isinstance(answer, tuple) else (answer, answer.status_code)
    return status, response.get_json()


def _opted_out():
    return _error(409, "the recipient has opted out of WhatsApp; nothing is sent until they opt back in")


def _window_shut(what: str, held_until: datetime | None) -> str:
    """Why the 24-hour window is shut for `what` (the message, the flow): now, or by the time it
    is held until."""
    if held_until is None:
        return "the recipient has not written in the last 24 hours"
    return (f"the {what} is held until {isoformat(held_until)} and the recipient's 24-hour window will "
            "have closed by then")


def _window_closed(held_until: datetime | None = None):
    when = _window_shut("message", held_until)
    return _error(
        422,
        f"{when}, so WhatsApp allows no free-form "
        "message; send an approved template instead: {\"to\", \"template\", \"variables\"}",
        templates=sorted(current_app.config["TWILIO_CONTENT_SIDS"]),
    )


def _no_copy_in_locale(template: str, locale: str | None, skipped: dict[str, str] | None = None):
    """400: the template exists, but in no language the recipient's locale resolves to (exact,
    its language, DEFAULT_LOCALE); nothing is sent rather than the wrong language."""
    default = locales.default_locale()
    wanted = f"locale {locale!r}" if locale else "no locale (the default applies)"
    extra: dict[str, Any] = {"template": template, "locale": locale}
    if skipped is not None:
        extra["skipped"] = skipped
    return _error(400, f"template {template!r} has no copy for the recipient's {wanted}, its language or "
                       f"the default locale {default!r} on any channel that could carry it; nothing was sent",
                  **extra)


def _whatsapp_sid(notification: NotifyRequest, locale: str | None) -> str | None:
    """The ContentSid a template message to this recipient carries: a SID the backend named
    itself as it is; a configured name's in the recipient's locale (bot/locales.py)."""
    if notification.template is None or notification.template not in current_app.config["TWILIO_CONTENT_SIDS"]:
        return notification.content_sid
    return locales.content_sid(notification.template, locale)


def _locale_of_number(notification: NotifyRequest) -> tuple[bool, str | None]:
    """Whether the number's stored locale matters for this message, and that locale: only for a
    template configured in more than the default locale (else no lookup on the hot path)."""
    template = notification.template
    if template is None or template not in current_app.config["TWILIO_CONTENT_SIDS"]:
        return False, None
    if locales.available_locales(Copy.WHATSAPP, template) == {locales.default_locale()}:
        return False, None
    return True, db.session.scalar(sa.select(Contact.locale).where(Contact.phone == notification.to))


def _notify_number(notification: NotifyRequest, key: str | None):
    """A message to a number: the contact (created if new), the refusals (opted out, an opt-out
    waiting for the engine, outside the 24-hour window) and the row with its Idempotency-Key, in
    one statement on PostgreSQL; the contact's facts and then the row on SQLite. One commit."""
    now = utcnow()
    params = _message_params(notification, key, Channel.WHATSAPP, now)
    matters, locale = _locale_of_number(notification)
    params["content_sid"] = _whatsapp_sid(notification, locale)
    params["locale"] = routing.message_locale(Channel.WHATSAPP, notification.template, locale)
    if notification.template is not None and params["content_sid"] is None:
        db.session.rollback()
        return _no_copy_in_locale(notification.template, locale if matters else None)
    params.update(phone=notification.to, window_opens=now - SESSION_WINDOW, any_time=not notification.is_free_form)
    # The number's timezone, read only when quiet hours apply (the hot path stays one statement
    # without them): a number of a user may have one; a number alone has DEFAULT_TIMEZONE.
    timezone_name = (db.session.scalar(_phone_timezone_statement(), {"phone": notification.to})
                     if _quiet_hours_of(notification) is not None else None)
    params["not_before"] = _hold(notification, timezone_name, now)
    # A held message must find the 24-hour window open when it leaves, not only now.
    leaves = params["not_before"] or now
    params["window_opens"] = leaves - SESSION_WINDOW
    dialect = db.session.get_bind().dialect.name
    try:
        if dialect == "postgresql":
            contact = db.session.execute(_notify_number_statement(key is not None), params).one_or_none()
            if contact is None:
                # A concurrent request created the number after this statement's snapshot: the
                # next statement sees it (READ COMMITTED).
                contact = db.session.execute(_notify_number_statement(key is not None), params).one()
            stored = contact.message_id is not None
        else:
            contact, stored = _contact_facts(notification.to, dialect, now), False
        refusal = _refusal(contact.consent, contact.stop_waiting, contact.last_inbound_at, notification, now,
                           params["not_before"])
        if stored != (refusal is None) and dialect == "postgresql":  # pragma: no cover - the two must agree
            raise RuntimeError("the refusal checks in SQL and in Python disagree")
        if refusal is not None:
            db.session.commit()  # a new number's contact is kept all the same
            return refusal
        params["contact_id"] = contact.id
        if not stored:
            _insert_message(params, key)
        # Enqueued once the row is committed; a held one is scheduled for its time (a hint: the
        # release finds it in the database whatever happens to the queue).
        outbox.defer_send(params["message_id"], params["kind"], at=params["not_before"])
        if params["not_before"] is not None:
            _report_held(params, contact.id, contact.user_id, notification.to)
        db.session.commit()
    except IntegrityError as exc:
        return _lost_key_race(exc, key, notification)
    return _accepted_as(params["message_id"], MessageStatus.PENDING, Channel.WHATSAPP, contact.user_id,
                        notification.to, now, send_at=params["send_at"], held_until=params["not_before"],
                        locale=params["locale"])


def _refusal(consent: str, stop_waiting: bool, last_inbound_at: datetime | None, notification: NotifyRequest,
             now: datetime, held_until: datetime | None = None):
    """The 409 or 422 for a message to this contact on WhatsApp, or None when it may be queued
    (a held one: the window must be open when it leaves). The SQL of `_notify_number_statement`
    says the same (its `allowed` CTE)."""
    if consent == Consent.OPTED_OUT or stop_waiting:
        return _opted_out()
    if notification.is_free_form and not within_window(last_inbound_at, held_until or now):
        return _window_closed(held_until)
    return None


def _lost_key_race(exc: IntegrityError, key: str | None, notification: NotifyRequest):
    """A concurrent request with the same Idempotency-Key committed first: its answer (or 422)."""
    db.session.rollback()
    replay = _replay(key, notification.fingerprint()) if key else None
    if replay is None:
        raise exc
    return replay


@functools.cache
def _facts_statement() -> sa.Select:
    contacts = Contact.__table__
    return (sa.select(*(contacts.c[name] for name in FACTS), opt_out_waiting_clause(contacts.c.id).label("stop_waiting"))
            .where(contacts.c.phone == sa.bindparam("phone")))


class ContactFacts(NamedTuple):
    """A contact as a message to its number needs it (`FACTS`, and whether a STOP waits)."""

    id: int
    user_id: str | None
    consent: str
    last_inbound_at: datetime | None
    stop_waiting: bool


def _contact_facts(phone: str, dialect: str, now: datetime) -> ContactFacts | sa.Row:
    """SQLite: the contact's facts (`FACTS` and `stop_waiting`), the contact created if new."""
    facts = db.session.execute(_facts_statement(), {"phone": phone}).one_or_none()
    if facts is None:
        new = db.session.execute(new_contact_statement(dialect), {"phone": phone, "now": now}).one_or_none()
        if new is not None:
            return ContactFacts(*new, stop_waiting=False)  # a new contact has sent nothing yet
        facts = db.session.execute(_facts_statement(), {"phone": phone}).one()  # created meanwhile
    return facts


def _message_params(notification: NotifyRequest, key: str | None, channel: str, now: datetime) -> dict[str, Any]:
    """The bound values of a new outbound message row (and its Idempotency-Key)."""
    return {
        "message_id": new_id(), "channel": channel, "subject": notification.subject, "body": notification.body,
        "media_urls": list(notification.media_urls) or None, "template": notification.template,
        "content_sid": notification.content_sid, "variables": notification.variables or None,
        "key": key, "request_hash": notification.fingerprint() if key else None,
        "metadata": notification.metadata, "kind": Kind.AGENT.value if notification.agent else Kind.NOTIFICATION.value,
        "now": now, "send_at": notification.send_at_utc, "not_before": None,
        # Kept on the row: the sender checks them again when it sends (invariant 15).
        "quiet_hours": str(quiet) if (quiet := _quiet_hours_of(notification)) is not None else None,
        "locale": None,  # the copy's, once the recipient's locale resolved it (routing.message_locale)
    }


def _message_columns(value: Any) -> dict[str, Any]:
    """A new outbound row's columns: `value(name, column)` gives each bound value's SQL."""
    messages = Message.__table__
    bound = {"id": "message_id", "channel": "channel", "subject": "subject", "body": "body",
             "media_urls": "media_urls", "template": "template", "content_sid": "content_sid",
             "variables": "variables", "idempotency_key": "key", "request_hash": "request_hash",
             "metadata": "metadata", "kind": "kind", "created_at": "now", "updated_at": "now",
             "send_at": "send_at", "not_before": "not_before", "quiet_hours": "quiet_hours",
             "locale": "locale"}
    columns = {name: value(param, messages.c[name]) for name, param in bound.items()}
    columns.update(direction=sa.literal(Direction.OUTBOUND.value), status=sa.literal(MessageStatus.PENDING.value),
                   status_rank=sa.literal(MessageStatus.PENDING.rank), attempts=sa.literal(0))
    return columns


def _key_columns(value: Any, target: Any) -> dict[str, Any]:
    keys = IdempotencyKey.__table__
    return {"key": value("key", keys.c.key), "kind": sa.literal(IdempotentKind.MESSAGE.value), "target_id": target,
            "request_hash": value("request_hash", keys.c.request_hash), "created_at": value("now", keys.c.created_at)}


def _bound(name: str, column: sa.Column) -> sa.BindParameter:
    return sa.bindparam(name, type_=column.type)


@functools.cache
def _insert_statements() -> tuple[sa.Insert, sa.Insert]:
    # Built once (bench/THROUGHPUT.md, "The web's hot path"); the message's contact is a parameter.
    columns = _message_columns(_bound)
    columns["contact_id"] = sa.bindparam("contact_id")
    return (sa.insert(Message.__table__).values(columns),
            sa.insert(IdempotencyKey.__table__).values(_key_columns(_bound, sa.bindparam("message_id"))))


def _insert_message(params: dict[str, Any], key: str | None) -> None:
    """The message row and its Idempotency-Key, once the refusals were checked (SQLite; a user's
    message on either database)."""
    message, idempotency_key = _insert_statements()
    db.session.execute(message, params)
    if key:
        db.session.execute(idempotency_key, params)


@functools.cache
def _notify_number_statement(with_key: bool) -> sa.Select:
    """PostgreSQL: one statement for a message to a number (data-modifying CTEs; SQLite has none).

    The contact by phone, inserted if new; the refusals (`_refusal`, the same conditions); the
    message row only when none applies; its Idempotency-Key with it. Returns the contact's facts
    and the message's id (None when refused). A key used concurrently violates the key's primary
    key (the caller replays the winner's answer)."""
    contact = contact_by_phone_cte()
    waiting = opt_out_waiting_clause(contact.c.id)
    allowed = (sa.select(contact.c.id).where(
        contact.c.consent != Consent.OPTED_OUT.value, ~waiting,
        sa.or_(sa.bindparam("any_time", type_=sa.Boolean), contact.c.last_inbound_at > sa.bindparam("window_opens")))
        .cte("allowed"))
    cast = lambda name, column: sa.cast(sa.bindparam(name, type_=column.type), column.type)  # noqa: E731
    columns = _message_columns(cast)
    columns["contact_id"] = allowed.c.id
    message = (sa.insert(Message.__table__).from_select(list(columns), sa.select(*columns.values()))
               .returning(Message.__table__.c.id).cte("message"))
    ctes = [allowed, message]
    if with_key:
        key_columns = _key_columns(cast, message.c.id)
        ctes.append(sa.insert(IdempotencyKey.__table__)
                    .from_select(list(key_columns), sa.select(*key_columns.values()).select_from(message))
                    .cte("idempotency_key"))
    return (sa.select(contact.c.id, contact.c.user_id, contact.c.consent, contact.c.last_inbound_at,
                      waiting.label("stop_waiting"), sa.select(message.c.id).scalar_subquery().label("message_id"))
            .add_cte(*ctes))


def _queue(notification: NotifyRequest, contact: Contact, channel: str, key: str | None, now: datetime,
           not_before: datetime | None, content_sid: str | None = None):
    """Store a user's message (the outbox; held until `not_before` if given) and answer 202; its
    send is enqueued after the commit. `content_sid`: the template's ContentSid in the user's
    locale (kept on an email too, for a fallback to WhatsApp in the same language)."""
    params = _message_params(notification, key, channel, now)
    params["contact_id"] = contact.id
    params["not_before"] = not_before
    if notification.template is not None:
        params["content_sid"] = content_sid
    # The copy's locale, fixed now: an email is rendered in it at send time (docs/ARCHITECTURE.md, "Languages").
    params["locale"] = routing.message_locale(channel, notification.template, contact.locale)
    user_id, to = contact.user_id, contact.address_on(channel)  # read before the commit expires them
    try:
        _insert_message(params, key)
        outbox.defer_send(params["message_id"], params["kind"], at=params["not_before"])  # after the commit
        if params["not_before"] is not None:
            _report_held(params, contact.id, user_id, to)
        db.session.commit()
    except IntegrityError as exc:
        return _lost_key_race(exc, key, notification)
    return _accepted_as(params["message_id"], MessageStatus.PENDING, channel, user_id, to, now,
                        send_at=params["send_at"], held_until=params["not_before"], locale=params["locale"])


def _commit_new_row(row: Message | Conversation, key: str | None, notification: NotifyRequest):
    """Commit a new row, and its Idempotency-Key in the same transaction; if a concurrent request
    with the same key won the race (for a message or a flow alike), return that request's answer
    instead (None when the commit went through)."""
    db.session.add(row)
    if key:
        if row.id is None:
            row.id = new_id()  # the key names it before the flush
        kind = IdempotentKind.CONVERSATION if isinstance(row, Conversation) else IdempotentKind.MESSAGE
        db.session.add(IdempotencyKey(key=key, kind=kind, target_id=row.id, request_hash=notification.fingerprint()))
    try:
        db.session.commit()
        return None
    except IntegrityError:
        db.session.rollback()
        replay = _replay(key, notification.fingerprint()) if key else None
        if replay is None:
            raise
        return replay


def _notify_user(notification: NotifyRequest, key: str | None):
    """/notify by the backend's user id: store the inline `user`, then the first usable channel
    in the user's order (or the pinned one) carries the message (bot.delivery.routing)."""
    stop_waiting: bool | None = None  # not known yet
    try:
        if notification.user is not None:
            contact, _ = upsert_user(notification.user_id, notification.user)
        else:
            # The user and whether a STOP of theirs waits for the engine, in one statement.
            row = db.session.execute(_user_statement(), {"user_id": notification.user_id}).one_or_none()
            contact, stop_waiting = row if row is not None else (None, None)
    except UserConflict as exc:
        db.session.rollback()
        return _error(409, str(exc))
    if contact is None:
        return _error(404, "no such user: store it first with PUT /users/<user_id>, or send its fields in 'user'")
    if stop_waiting is None:
        db.session.flush()
        stop_waiting = bool(contact.phone) and opt_out_waiting(contact.id)
    if notification.flow is not None:
        if not contact.phone:
            db.session.commit()
            return _error(422, "flows run on WhatsApp and this user has no phone")
        if contact.consent == Consent.OPTED_OUT or stop_waiting:
            db.session.commit()
            return _error(409, "the user has opted out of WhatsApp; nothing is sent until they opt back in")
        return _start_flow(notification, contact, key)
    content_sid = None
    if notification.template is not None:
        # The user's locale chooses the copy on each channel (bot/locales.py).
        direct = notification.content_sid if notification.template not in current_app.config["TWILIO_CONTENT_SIDS"] else None
        copy = template_copy(notification.template, contact.locale, direct_sid=direct)
        content_sid = copy.content_sid
        content = copy.content(notification.template, subject=notification.subject)
    else:
        content = Content(body=notification.body, subject=notification.subject, has_media=bool(notification.media_urls))
    now = utcnow()
    not_before = _hold(notification, contact.timezone, now)
    channel, skipped = routing.choose(contact, content, pinned=notification.channel, stop_waiting=stop_waiting,
                                      at=not_before)
    if channel is None:
        db.session.commit()  # the inline user is stored all the same
        reasons = {name: str(reason) for name, reason in skipped.items()}
        if Unusable.OPTED_OUT in skipped.values() and set(skipped.values()) <= {Unusable.OPTED_OUT, Unusable.NO_ADDRESS}:
            return _error(409, "the user has opted out of every channel that could reach them", skipped=reasons)
        if Unusable.NO_COPY_IN_LOCALE in skipped.values():
            return _no_copy_in_locale(notification.template, contact.locale, reasons)
        if skipped == {Channel.WHATSAPP: Unusable.WINDOW_CLOSED}:
            return _window_closed(not_before)
        return _error(422, "no channel can carry this message to this user: "
                           + ", ".join(f"{name}: {reason}" for name, reason in reasons.items()), skipped=reasons)
    return _queue(notification, contact, channel, key, now, not_before, content_sid)


@functools.cache
def _user_statement() -> sa.Select:
    # Built once (bench/THROUGHPUT.md, "The web's hot path").
    return (sa.select(Contact, opt_out_waiting_clause(Contact.id))
            .where(Contact.user_id == sa.bindparam("user_id")))


def _start_flow(notification: NotifyRequest, contact, key: str | None):
    """Queue a backend-started conversation; the worker runs the flow (none of it runs here)."""
    if in_handoff(contact):
        db.session.commit()
        return _error(409, "the recipient is with a person (human handoff): the bot starts no flow until "
                           "DELETE /contacts/<phone>/handoff or the handoff ends")
    flow = registry()[notification.flow]
    template = flow.start_content_template
    # Held like a notification (invariant 15): until its send_at, past the user's quiet hours;
    # the window must be open when it starts, not only now.
    not_before = _hold(notification, contact.timezone, utcnow())
    if not within_window(contact.last_inbound_at, not_before) \
            and (not template or locales.content_sid(template, contact.locale) is None):
        db.session.commit()
        if template and locales.available_locales(Copy.WHATSAPP, template):
            return _no_copy_in_locale(template, contact.locale)  # approved, but not in their language
        when = _window_shut("flow", not_before)
        return _error(
            422,
            f"{when}; flow {flow.name!r} can open the "
            f"conversation outside the window only with its approved template "
            f"{template!r} configured in TWILIO_CONTENT_SIDS" if template else
            f"{when} and flow {flow.name!r} has no "
            "approved template to open the conversation with",
        )
    conversation = Conversation(
        contact_id=contact.id, flow=flow.name, status=ConversationStatus.STARTING, started_by=StartedBy.BACKEND,
        variables=notification.variables, data={}, idempotency_key=key,
        request_hash=notification.fingerprint() if key else None, backend_metadata=notification.metadata,
        send_at=notification.send_at_utc, not_before=not_before,
        # Its first messages carry them: the sender holds those too (never its later replies).
        quiet_hours=str(quiet) if (quiet := _quiet_hours_of(notification)) is not None else None,
    )
    outbox.defer_conversation_start(conversation, at=not_before)  # held: a hint, the release decides
    if not_before is not None:
        # Said in the transaction that stores it (invariant 12), as message.held is for a message.
        if conversation.id is None:
            conversation.id = new_id()
        events.conversation_held(conversation, phone=contact.phone, user_id=contact.user_id,
                                 reason=hold_reason(conversation.send_at, not_before))
    race = _commit_new_row(conversation, key, notification)
    if race is not None:
        return race
    return _conversation_accepted(conversation)


@bp.get("/messages/<message_id>")
@require_api_token
def get_message(message_id: str):
    """A message's status, error, Twilio SID and the history of status callbacks."""
    if not is_public_id(message_id):
        abort(404, description=f"no message with id {message_id[:64]!r}")
    message = db.session.scalar(
        sa.select(Message).options(selectinload(Message.contact)).where(Message.id == message_id)
    )
    if message is None:
        abort(404, description=f"no message with id {message_id!r}")
    # The provider's callbacks about it: Twilio's status callbacks, or SendGrid's events.
    history = EmailEvent if message.channel == Channel.EMAIL else StatusEvent
    events = db.session.scalars(
        sa.select(history).where(history.message_id == message.id).order_by(history.id)
    ).all()
    data = message.to_dict(events=list(events))
    data["fallback"] = db.session.scalar(sa.select(Message.id).where(Message.fallback_of == message.id))
    return jsonify(data)
