"""The one exception type for mistakes a user can make.

The command line catches `ItmatchError` and prints its message as a single line with a non-zero
exit status; anything else is a bug and keeps its traceback.
"""


class ItmatchError(Exception):
    """Bad input, a bad config value, a missing or corrupt file: something the user can fix."""


# One terminal line should stay readable; longer messages are cut at a word boundary and written in full
# to a log file that the cut line names (an exception's text from a library can run to pages).
MAX_MESSAGE = 400


def error_log_path():
    import os
    from pathlib import Path

    return Path(os.environ.get("ITMATCH_CACHE", ".cache")) / "errors.log"


def clip_message(text: str, limit: int = MAX_MESSAGE) -> tuple[str, bool]:
    """(one line of at most about `limit` characters cut at a word boundary, whether it was cut)."""
    flat = " ".join(str(text).split())
    if len(flat) <= limit:
        return flat, False
    cut = flat.rfind(" ", 0, limit)
    cut = cut if cut > limit // 2 else limit  # one enormous word (a path, a hex dump): cut inside it
    return flat[:cut].rstrip(" ,;:") + " ...", True


def user_message(exc: BaseException) -> str:
    """The line the command line prints for `exc`; when cut, the full text goes to `error_log_path()`."""
    import time

    line, cut = clip_message(str(exc))
    if not cut:
        return line
    path = error_log_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {exc}\n")
    except OSError:
        return line
    return f"{line} (full message in {path})"
