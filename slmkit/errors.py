"""The one exception type that carries a message meant for the user, not a traceback."""


class UserError(Exception):
    """Something the user can fix: a bad parameter, an unreachable source, a malformed file.

    Steps print its message on one line and exit non-zero, so the MLflow run ends FAILED.
    """


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """`value` if it is one of `choices`, else the one-line refusal every param with fixed values gets."""
    if value not in choices:
        raise UserError(f"{name}={value!r}: choose one of {', '.join(choices)}")
    return value
