//! Metrics (issue 11/14, DESIGN §8): the Prometheus `/metrics` endpoint. Being written.
