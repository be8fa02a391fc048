"""The one exception type for user mistakes (bad config, missing corpus, bad request).

Launch entry points catch it, print its message and exit with code 1: a user error never
surfaces as a raw traceback. Messages name the offending field and say how to fix it.
"""


class UserError(ValueError):
    """A mistake in the user's input or configuration; the message names the field and the fix."""
