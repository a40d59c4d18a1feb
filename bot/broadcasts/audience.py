"""A broadcast's audience: stored as listed by the request, resolved into recipients by the worker.

Resolving reads `BROADCAST_BATCH` entries at a time by keyset (the listed ids and phones by
position, then the tagged users by contact id), so the worker's memory is bounded by the batch,
never by the audience. Each entry becomes one `BroadcastRecipient` (one per person, on the channel
the user's order or the broadcast's pin chooses) or a skip counted by reason: nobody with that
id, a number libphonenumber refuses, opted out, in a handoff, listed twice, no usable channel, a
`$user.<field>` the user lacks (docs/delivery.md, "Broadcasts").
"""
from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any, Iterable

import sqlalchemy as sa
from flask import current_app

from bot.clock import utcnow
from bot.contacts import dialect_insert, opt_out_waiting_clause
from bot.delivery import routing
from bot.delivery.routing import Content, TemplateCopy, Unusable, message_locale, template_copy
from bot.extensions import db
from bot.broadcasts.variables import has_user_references, resolve_variables
from bot.models import Broadcast, BroadcastRecipient, BroadcastTarget, Contact, ContactTag
from bot.phone import InvalidNumber, normalize_e164
from bot.vocabulary import Channel, Consent


class Skip:
    """Why an audience entry got no message (the keys of GET /broadcasts/<id>'s `skipped`)."""

    UNKNOWN_USER = "unknown_user"
    INVALID_PHONE = "invalid_phone"
    OPTED_OUT = "opted_out"
    HANDOFF = "handoff"
    DUPLICATE = "duplicate"
    MISSING_USER_FIELD = "missing_user_field"
    #: The template has copy, but in no language the user's locale resolves to (bot/locales.py).
    NO_TEMPLATE_FOR_LOCALE = "no_template_for_locale"


def store_targets(broadcast_id: str, user_ids: Iterable[str], phones: Iterable[str]) -> int:
    """Store the listed user ids, then phones, in order (positions from 1); returns how many.

    PostgreSQL: one INSERT … SELECT over `unnest` of each list (100,000 entries in a few hundred
    milliseconds); SQLite: one executemany. Does not commit."""
    user_ids, phones = list(user_ids), list(phones)
    if db.session.get_bind().dialect.name == "postgresql":
        statement = sa.text(
            "INSERT INTO broadcast_targets (broadcast_id, position, user_id, phone) "
            "SELECT :broadcast_id, ordinality + :offset, CASE WHEN :by_user THEN value END, "
            "CASE WHEN :by_user THEN NULL ELSE value END "
            "FROM unnest(CAST(:values AS text[])) WITH ORDINALITY AS listed(value, ordinality)")
        for offset, values, by_user in ((0, user_ids, True), (len(user_ids), phones, False)):
            if values:
                db.session.execute(statement, {"broadcast_id": broadcast_id, "offset": offset, "values": values,
                                               "by_user": by_user})
    else:
        rows = [{"broadcast_id": broadcast_id, "position": position, "user_id": user_id, "phone": None}
                for position, user_id in enumerate(user_ids, start=1)]
        rows += [{"broadcast_id": broadcast_id, "position": position, "user_id": None, "phone": phone}
                 for position, phone in enumerate(phones, start=len(user_ids) + 1)]
        if rows:
            db.session.execute(sa.insert(BroadcastTarget), rows)
    return len(user_ids) + len(phones)


def batch_size() -> int:
    """Audience entries resolved per transaction (BROADCAST_BATCH)."""
    return int(current_app.config["BROADCAST_BATCH"])


def expand_batch(broadcast: Broadcast) -> bool:
    """Resolve the next batch of the audience into recipients; True once it is all resolved.

    Listed entries first (by position), then tagged users (by contact id). Does not commit: the
    pump commits the recipients, the counts and the cursor together, so a worker killed
    mid-batch redoes the batch, never half of it."""
    limit = batch_size()
    if broadcast.targets_done < broadcast.targets:
        targets = db.session.execute(
            sa.select(BroadcastTarget.position, BroadcastTarget.user_id, BroadcastTarget.phone)
            .where(BroadcastTarget.broadcast_id == broadcast.id, BroadcastTarget.position > broadcast.targets_done)
            .order_by(BroadcastTarget.position).limit(limit)).all()
        if targets:
            _resolve_listed(broadcast, targets)
            broadcast.targets_done = targets[-1].position
        if len(targets) == limit:
            return False
        broadcast.targets_done = broadcast.targets
    if broadcast.tags:
        contact_ids = list(db.session.scalars(
            sa.select(ContactTag.contact_id).where(ContactTag.tag.in_(broadcast.tags),
                                                   ContactTag.contact_id > broadcast.tag_cursor)
            .group_by(ContactTag.contact_id).order_by(ContactTag.contact_id).limit(limit)))
        if contact_ids:
            contacts = _contacts(Contact.id.in_(contact_ids))
            _add(broadcast, [contacts.get(contact_id) for contact_id in contact_ids], Counter())
            broadcast.tag_cursor = contact_ids[-1]
        if len(contact_ids) == limit:
            return False
    return True


def _contacts(where: sa.ColumnElement[bool]) -> dict[Any, tuple[Contact, bool]]:
    rows = db.session.execute(sa.select(Contact, opt_out_waiting_clause(Contact.id)).where(where)).all()
    return {contact.id: (contact, bool(waiting)) for contact, waiting in rows}


def _resolve_listed(broadcast: Broadcast, targets: list[sa.Row]) -> None:
    """The listed user ids and phones of one batch, as contacts (a number new to us becomes one)."""
    skipped: Counter[str] = Counter()
    user_ids = {target.user_id for target in targets if target.user_id is not None}
    by_user = {contact.user_id: (contact, waiting) for contact, waiting in
               _contacts(Contact.user_id.in_(user_ids)).values()} if user_ids else {}
    phones: dict[int, str] = {}
    for target in targets:
        if target.phone is not None:
            try:
                phones[target.position] = normalize_e164(target.phone)
            except InvalidNumber:
                pass
    if phones:
        dialect = db.session.get_bind().dialect.name
        now = utcnow()
        db.session.execute(
            dialect_insert(dialect, Contact.__table__).on_conflict_do_nothing(index_elements=["phone"]),
            [{"phone": phone, "consent": Consent.UNKNOWN.value, "email_consent": Consent.UNKNOWN.value,
              "created_at": now, "updated_at": now} for phone in sorted(set(phones.values()))])
    by_phone = {contact.phone: (contact, waiting) for contact, waiting in
                _contacts(Contact.phone.in_(set(phones.values()))).values()} if phones else {}
    found: list[tuple[Contact, bool] | None] = []
    for target in targets:
        if target.user_id is not None:
            entry = by_user.get(target.user_id)
            if entry is None:
                skipped[Skip.UNKNOWN_USER] += 1
                continue
        else:
            phone = phones.get(target.position)
            if phone is None:
                skipped[Skip.INVALID_PHONE] += 1
                continue
            entry = by_phone[phone]
        found.append(entry)
    _add(broadcast, found, skipped)


class _Copies:
    """The broadcast's copy in each locale met in a batch (one resolution per locale, not per person)."""

    def __init__(self, broadcast: Broadcast) -> None:
        self.broadcast = broadcast
        self.by_locale: dict[str | None, TemplateCopy] = {}
        self.resolved: dict[tuple[str | None, str], str | None] = {}

    def content(self, locale: str | None) -> tuple[Content, str | None]:
        """What the choice of channel sees for a recipient in `locale`, and the WhatsApp ContentSid."""
        broadcast = self.broadcast
        if broadcast.template is None:
            return Content(body=broadcast.body, subject=broadcast.subject), None
        copy = self.by_locale.get(locale)
        if copy is None:
            copy = self.by_locale[locale] = template_copy(broadcast.template, locale, direct_sid=broadcast.content_sid)
        return copy.content(broadcast.template, subject=broadcast.subject), copy.content_sid

    def locale(self, locale: str | None, channel: str) -> str | None:
        """The locale the copy on `channel` is in for a recipient in `locale` (stored on the
        recipient, then on its message: docs/ARCHITECTURE.md, "Languages")."""
        key = (locale, channel)
        if key not in self.resolved:
            self.resolved[key] = message_locale(channel, self.broadcast.template, locale) \
                if self.broadcast.content_sid is None or channel == Channel.EMAIL else None
        return self.resolved[key]


def _unusable_reason(skipped: dict[str, Unusable]) -> str:
    """One skip reason from why each channel was unusable: opted out when that is what kept the
    person out, else the one reason, else `no_channel`."""
    reasons = set(skipped.values())
    if Unusable.NO_COPY_IN_LOCALE in reasons:
        return Skip.NO_TEMPLATE_FOR_LOCALE
    if Unusable.OPTED_OUT in reasons and reasons <= {Unusable.OPTED_OUT, Unusable.NO_ADDRESS}:
        return Skip.OPTED_OUT
    if len(reasons) == 1:
        return str(reasons.pop())
    return "no_channel"


def _add(broadcast: Broadcast, entries: list[tuple[Contact, bool] | None], skipped: Counter[str]) -> None:
    """Turn one batch of contacts into recipients (deduplicated against this batch and every
    earlier one), counting what is skipped and why."""
    now = utcnow()
    copies = _Copies(broadcast)
    references = has_user_references(broadcast.variables)
    candidates = {entry[0].id for entry in entries if entry is not None}
    seen = set(db.session.scalars(
        sa.select(BroadcastRecipient.contact_id).where(BroadcastRecipient.broadcast_id == broadcast.id,
                                                       BroadcastRecipient.contact_id.in_(candidates)))) \
        if candidates else set()
    rows: list[dict[str, Any]] = []
    for entry in entries:
        if entry is None:  # a tagged user deleted meanwhile
            continue
        contact, stop_waiting = entry
        content, content_sid = copies.content(contact.locale)
        reason, channel, variables = _decide(broadcast, contact, stop_waiting, content, references, seen, now)
        if reason is not None:
            skipped[reason] += 1
            continue
        seen.add(contact.id)
        rows.append({"broadcast_id": broadcast.id, "position": broadcast.recipients + len(rows) + 1,
                     "contact_id": contact.id, "channel": channel, "variables": variables,
                     "content_sid": content_sid if channel == Channel.WHATSAPP else None,
                     "locale": copies.locale(contact.locale, channel)})
    if rows:
        db.session.execute(sa.insert(BroadcastRecipient), rows)
        broadcast.recipients += len(rows)
    if skipped:
        total = Counter(broadcast.skipped or {})
        total.update(skipped)
        broadcast.skipped = dict(total)  # a new object: the JSON column is written


def _decide(broadcast: Broadcast, contact: Contact, stop_waiting: bool, content: Content, references: bool,
            seen: set[int], now: datetime) -> tuple[str | None, str | None, dict[str, str] | None]:
    """(skip reason, None, None) or (None, channel, this recipient's own variables or None)."""
    if contact.id in seen:
        return Skip.DUPLICATE, None, None
    channel, unusable = routing.choose(contact, content, pinned=broadcast.channel, stop_waiting=stop_waiting)
    if channel is None:
        return _unusable_reason(unusable), None, None
    if contact.handoff_until is not None and contact.handoff_until > now:
        return Skip.HANDOFF, None, None
    variables = None
    if references:
        variables = resolve_variables(broadcast.variables or {}, {
            "name": contact.name, "user_id": contact.user_id, "locale": contact.locale, "timezone": contact.timezone})
        if variables is None:
            return Skip.MISSING_USER_FIELD, None, None
    return None, channel, variables
