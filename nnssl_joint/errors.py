"""Exceptions the command line reports without a traceback: each message names the file, field or
value at fault and says how to fix it."""


class NnsslJointError(ValueError):
    """A user-facing error: bad input, a missing setting, or a mismatch the user can fix."""
