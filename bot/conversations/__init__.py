"""Conversations: storing inbound messages, the engine that runs flows, consent, rendering replies."""
