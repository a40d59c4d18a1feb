"""WhatsApp through Twilio: the SDK client, Twilio's error codes, the rules WhatsApp imposes, one
send and its lookup, the status callbacks — and `channel.WhatsAppChannel`, which puts them behind
the channel interface (bot/channels/base.py).

Every Twilio or WhatsApp fact the sender needs lives here; the email channel is a sibling of this
package (docs/ARCHITECTURE.md, "The channel seam").
"""
