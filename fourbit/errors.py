"""The one exception type for mistakes a user can make (bad files, shapes, flags).

The CLI prints its message as a single line and exits non-zero; the message names the fix.
"""


class FourbitError(ValueError):
    pass
