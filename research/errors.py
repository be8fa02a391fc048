"""The exception types for user mistakes (bad config, missing corpus, bad request).

Launch entry points catch UserError, print its message and exit with code 1: a user error
never surfaces as a raw traceback. Messages name the offending field and say how to fix it.
"""


class UserError(ValueError):
    """A mistake in the user's input or configuration; the message names the field and the fix."""


class RequestError(UserError):
    """A bad field of one generation request (a prompt or a sampling setting).

    Carries the field by name so that each front end reports it in its own terms: the HTTP
    server maps `field` to the request parameter (max_new_tokens -> max_tokens) and answers
    400 with `rule`; a library caller reads `str(error)`. Never parse the message text.

    Attributes:
      field: the SamplingParams field, or "prompt".
      value: the offending value (shown shortened).
      rule: what the value must be and how to fix it, e.g. "must be in [0, 2]".
      code: a machine-readable code where one is standard (OpenAI's
        "context_length_exceeded").
    """

    def __init__(self, field: str, value, rule: str, *, code: str | None = None):
        self.field, self.value, self.rule, self.code = field, value, rule, code
        super().__init__(
            f"{field}={_short(value)} {rule}." if value is not None else f"{field} {rule}."
        )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
