"""The error raised for bad input data."""


class DataError(ValueError):
    """Bad input data. The message names the file and frame and says what to do."""
