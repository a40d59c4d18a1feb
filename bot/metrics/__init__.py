"""Metrics: the deployment's state read at scrape time (`readings`), what processes count
(`counters`), and the Prometheus exposition of both (docs/metrics.md)."""
