"""Validation of influence scores: exact Gauss-Newton inverse products, baselines, metrics, fact tracing."""
