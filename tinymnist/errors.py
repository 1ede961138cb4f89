"""The one exception type users see.

Every mistake a user can fix (a bad flag, a corrupt file, no network) raises a
`TinyMnistError` whose message is one line naming the file or flag and what to do.
The CLI prints that line and exits with status 2; anything else is a bug and keeps
its traceback.
"""


class TinyMnistError(Exception):
    """A user-facing error: the message is one line, naming the file or flag."""
