"""User-facing errors: the CLI prints these as one line on stderr and exits with code 2."""


class PeftlabError(Exception):
    """An error caused by the user's input (config, data, model, paths), not by a bug."""


class ConfigError(PeftlabError):
    """The config or an override is invalid."""


class DataError(PeftlabError):
    """The data set is missing, empty or malformed."""


class ModelError(PeftlabError):
    """The model cannot be found or loaded."""


class MethodError(PeftlabError):
    """A fine-tuning method cannot be applied as configured."""


class FitError(PeftlabError):
    """The run will not fit in the device's memory."""
