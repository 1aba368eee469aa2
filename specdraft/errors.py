"""The one error type every layer shares: bad user input, reported as one message and exit code 2."""


class InputError(ValueError):
    """Bad user input (job, data, models): the CLI prints the message and exits with code 2."""
