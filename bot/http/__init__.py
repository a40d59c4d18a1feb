"""The HTTP layer: every route, its request authentication and its request schemas.

Routes validate, store and enqueue; they never call Twilio and never run a flow
(docs/ARCHITECTURE.md, "Web answers fast").
"""
