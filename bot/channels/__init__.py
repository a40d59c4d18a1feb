"""The channels a message can leave by: one package per channel, behind one small interface.

The shape is RapidPro courier's `handlers/` (one sibling directory per channel type): each channel
builds a send from a message, sends it and answers with one of the channel-neutral outcomes of
`bot.channels.outcomes` (accepted / failed, with a code and whether to retry / unknown: "may have
been accepted"), parses its provider's callbacks, and maps the provider's status names onto ours
at the edge. The sender, the claims, the outbox and the events know no provider
(docs/ARCHITECTURE.md, "Email channel (pieces)").

`bot.channels.email` is SendGrid's. Nothing here imports Flask or the database: a channel is pure
code plus its provider's SDK, so its packages import downward only.
"""
