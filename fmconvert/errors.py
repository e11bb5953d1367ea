"""One exception type for every user-facing failure, with the exit code the CLI returns."""

# Exit codes, documented in the README. 1 is reserved for `verify` finding a parity failure.
EXIT_PARITY = 1
EXIT_BAD_INPUT = 2
EXIT_IO = 3
EXIT_INTERNAL = 4


class FmError(Exception):
    """A problem the user can act on. The CLI prints `error: <message>` on one line, no traceback."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ParityError(FmError):
    exit_code = EXIT_PARITY
