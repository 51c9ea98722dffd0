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


def file_in_the_way(path):
    """The first existing file among ``path`` and its parents (a file where the command needs a folder), or None:
    checked before a long step, so such a path is refused before the work, not after it. → a ``Path`` or None."""
    from pathlib import Path

    path = Path(path)
    return next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
