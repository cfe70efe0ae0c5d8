"""One exception family for bad input, so the CLI exits with a message and the API answers 400."""


class KnSteerError(ValueError):
    """Bad input or state a user can fix; the message says what is wrong and where."""


class UnsupportedArchitecture(KnSteerError):
    pass


class NeuronSetMismatch(KnSteerError):
    pass


class SpecError(KnSteerError):
    """An invalid ``kn_steer`` request spec (HTTP 400 at the API edge)."""


class DataError(KnSteerError):
    """A malformed data file: the message names the file, line and field."""
