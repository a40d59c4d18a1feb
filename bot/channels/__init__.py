"""The channels a message can leave by: one package per channel, behind one small interface.

The shape is RapidPro courier's `handlers/` (one sibling directory per channel type): each
channel's `channel.py` implements `bot.channels.base.Channel` — build a send from a message (or
refuse it), send it and answer with one of the channel-neutral outcomes of `bot.channels.outcomes`
(accepted / failed, with a code and whether to retry / unknown: "may have been accepted"), look
up a send whose answer was lost where the provider can, parse the provider's callbacks, and map
its status names onto ours at the edge. The sender, the claims, the outbox and the events know
no provider (docs/ARCHITECTURE.md, "The channel seam").

`bot.channels.whatsapp` is Twilio's, `bot.channels.email` SendGrid's. A channel's pieces (the
request, the answer's meaning, signatures) are pure code plus the provider's SDK; its
`channel.py` reads the app's configuration and, for a lookup, the database. A channel imports
no role package (delivery, conversations, http: tests/test_architecture.py).
"""
