"""The Twilio edge: the SDK client, Twilio's error codes, and the rules WhatsApp imposes.

Everything that knows a Twilio or WhatsApp fact lives here, so a second channel is a sibling of
this package (docs/ARCHITECTURE.md, "Adding an outbound channel").
"""
