"""The one family of exceptions a user can cause. The CLI prints their message, not a traceback."""


class LoraforgeError(Exception):
    """Base class: something the user can fix; the message says what and how."""


class ConfigError(LoraforgeError):
    """A configuration value is missing, unknown or out of range; the message names the key."""


class AdapterError(LoraforgeError):
    """An adapter does not fit the model, or an adapter operation is not allowed in the current state."""


class AdapterFileError(AdapterError):
    """An adapter folder is missing, unreadable, pickled, or does not match the model (names the tensor)."""


class MergeError(AdapterError):
    """Merging would produce non-finite weights; nothing was changed."""


class DataError(LoraforgeError):
    """A data file or row is unusable; the message names file:line and the reason."""


class TrainingError(LoraforgeError):
    """Training cannot go on (e.g. the loss kept being NaN); the last complete checkpoint is intact."""


class QuantizationError(LoraforgeError):
    """A quantized layer's round trip is off its format's bound (a library kernel wrong on this machine)."""
