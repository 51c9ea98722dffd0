"""The one error type a user can cause.

Library code raises ``CkdError`` with a sentence that names the file / field / row and the fix;
the CLI prints it on one line and exits with code 2. Anything else is a bug and keeps its traceback.
"""


class CkdError(Exception):
    """A problem with the user's input or environment (bad file, bad job spec, unknown snapshot...)."""

    exit_code = 2


def excerpt(text: str, limit: int = 120) -> str:
    """Text from a file or a library's error, fit for a one-line message: its first line, each run of characters
    that do not print (control bytes, U+FFFD from undecodable bytes) as one '?', at most ``limit`` characters."""
    line = (str(text).strip().splitlines() or [""])[0]
    out, junk = [], False
    for ch in line:
        bad = not ch.isprintable() or ch == "\ufffd"
        if not (bad and junk):
            out.append("?" if bad else ch)
        junk = bad
    line = "".join(out)
    return line if len(line) <= limit else line[: limit - 1] + "…"
