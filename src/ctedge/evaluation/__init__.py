"""Evaluation, audit, explanations and reports."""
