"""The one exception type users see: a single line naming the problem and the fix.

Everything that can go wrong because of user input (a bad model directory, a missing backend, an unreadable
image, an unsupported config value) raises `Dalle2Error`. The CLI prints its message as one line and exits 2;
library callers can catch it. Internal bugs stay ordinary exceptions with tracebacks. `Dalle2Warning` is what
goes on with a change the user should know of (a prompt cut at the tokenizer's window); the CLI prints it as one
line `warning: ...`.
"""


class Dalle2Error(Exception):
    """A user-facing error whose message is one line: what is wrong, and what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # keep it one line whatever the caller wrote


class Dalle2Warning(UserWarning):
    """Work goes on, changed in a way the user should know of; one line, like Dalle2Error."""
