"""The one exception type that the CLI prints as a clear one-line error instead of a traceback."""


class TipslabError(Exception):
    """Bad input from the user: a wrong key, a missing file, a file of the wrong kind.

    The message names the file, key or sample and what was expected.
    """
