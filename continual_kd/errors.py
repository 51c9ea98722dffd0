"""The one error type a user can cause.

Library code raises ``CkdError`` with a sentence that names the file / field / row and the fix;
the CLI prints it on one line and exits with code 2. Anything else is a bug and keeps its traceback.
"""


class CkdError(Exception):
    """A problem with the user's input or environment (bad file, bad job spec, unknown snapshot...)."""

    exit_code = 2
