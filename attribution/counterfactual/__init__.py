"""Counterfactual validation: do the scores predict what retraining does (LDS), and what the proximal
objective that damped influence approximates does (PBRF)? See :mod:`attribution.counterfactual.run`."""
