"""Exceptions raised by iconv."""


class NotInvertibleError(ValueError):
    """A convolution whose spectrum is (numerically) singular was asked to invert.

    ``frequency`` is the ``(u, v)`` index of the worst-conditioned block in the half spectrum
    and ``condition_number`` its 1-norm condition number (``inf`` when exactly singular).
    """

    def __init__(self, message: str, frequency=None, condition_number=None):
        super().__init__(message)
        self.frequency = frequency
        self.condition_number = condition_number
