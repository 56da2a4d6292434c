"""User-facing errors. Each one names its cause; the experiment entry point prints it without a traceback."""


class SFTError(Exception):
    """Base class for errors caused by the user's input or settings, not by a bug."""


class ConfigError(SFTError, ValueError):
    """A setting is missing, of the wrong type, or out of range."""


class DataError(SFTError, ValueError):
    """A dataset file, column or row cannot be used."""
