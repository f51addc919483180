"""The one exception type that carries a message meant for the user, not a traceback."""


class UserError(Exception):
    """Something the user can fix: a bad parameter, an unreachable source, a malformed file.

    Steps print its message on one line and exit non-zero, so the MLflow run ends FAILED.
    """
