"""The one exception type for mistakes a user can make.

The command line catches `ItmatchError` and prints its message as a single line with a non-zero
exit status; anything else is a bug and keeps its traceback.
"""


class ItmatchError(Exception):
    """Bad input, a bad config value, a missing or corrupt file: something the user can fix."""
