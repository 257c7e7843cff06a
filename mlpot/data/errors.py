"""The error raised for bad input data."""
from ..errors import UserError


class DataError(UserError, ValueError):
    """Bad input data (exit code 2). The message names the file and frame and says what to do."""
