"""Delivery: the queue, its tasks, the transactional outbox, the send path and message statuses."""
