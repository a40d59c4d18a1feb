"""Broadcasts: one message to many people, at the bulk share of each sender's rate.

The request stores the audience as listed (`audience.store_targets`) and answers; the worker's
pump (`pump.pump`) resolves it a batch at a time into recipients (`audience.expand_batch`: one
per person, skips counted by reason) and releases their messages a window at a time, so the
outbox never holds more of a broadcast than a few seconds of its share of the rate
(docs/delivery.md, "Broadcasts"; invariant 16). It imports the delivery package (outbox,
routing, events), never the reverse: the tasks module wires the pump in.
"""
