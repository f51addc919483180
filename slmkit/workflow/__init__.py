"""The steps as a workflow: their declarations, the step cache, lineage between runs, the step CLI,
the tracking server checks and Databricks task values. This is the part that knows of MLflow runs.
"""
