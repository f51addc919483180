"""Batch inference: the rows' request and answer columns, and the Spark and in-process engines."""
