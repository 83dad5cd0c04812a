"""The one exception type for bad input: the CLI prints its message as a single line and exits non-zero."""


class SlimformerError(Exception):
    """A user-facing error: bad input, a missing file or an unsupported model, said in one line."""
