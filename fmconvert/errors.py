"""One exception type for every user-facing failure, with the exit code the CLI returns.

Exit codes (docs/robustness.md):
  0    success
  1    `verify` found a parity or integrity failure
  2    bad input: a malformed or unsupported checkpoint, config, manifest or option; an OUT_DIR that exists or
       that another fmconvert is writing; a tampered or missing shard when loading
  3    I/O: disk full, file too large, permission denied, an unreadable file
  4    internal error: a bug in fmconvert (FMCONVERT_DEBUG=1 shows the traceback)
  130  interrupted (Ctrl-C or SIGTERM); a conversion leaves nothing behind
"""

import re

EXIT_PARITY = 1
EXIT_BAD_INPUT = 2
EXIT_IO = 3
EXIT_INTERNAL = 4
EXIT_INTERRUPTED = 130


CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class FmError(Exception):
    """A problem the user can act on. The CLI prints `error: <message>` on one line, no traceback."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, exit_code: int | None = None):
        # Messages quote names taken from the input (tensor names, paths, keys), which may hold newlines or other
        # control characters: escaped here, so every message stays one line whatever it quotes.
        super().__init__(CONTROL_CHARS.sub(lambda c: repr(c.group())[1:-1], message))
        if exit_code is not None:
            self.exit_code = exit_code


class ParityError(FmError):
    exit_code = EXIT_PARITY
