"""What `python -m slmkit.serve` hands the uvicorn workers that build the app, and its defaults.

The CLI (`slmkit.serving.cli`) sets these variables before uvicorn starts its workers; each
worker's `slmkit.serving.app.app_from_environment` reads them back.
"""

MODEL_PATH_ENV = "SLMKIT_SERVE_MODEL_PATH"
MAX_BODY_ENV = "SLMKIT_MAX_BODY_BYTES"
MAX_IN_FLIGHT_ENV = "SLMKIT_MAX_IN_FLIGHT"
DEFAULT_MAX_BODY_BYTES = 1_000_000
DEFAULT_MAX_IN_FLIGHT = 64
