"""Evaluation: the eval stage and its plots."""
