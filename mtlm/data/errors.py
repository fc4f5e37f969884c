"""The one exception type of the data package."""


class DataError(ValueError):
    """A bad data setting or input file.

    The message is a single line that names the config key or file and says what to do, so the config
    validator and the CLI can print it as is instead of a traceback.
    """
