"""Evaluating both models alike: scoring rows, MLflow scorers, measuring in a process of its own,
the comparison report and `main`'s summary, and the gate that registers and promotes.
"""
