"""The project's own error types: what a user can cause and fix.

A stage prints one of these as one line (`<stage>: error: ...`) and exits 1. Anything else is a bug in
the toolkit and keeps its traceback. Each error that is also a `ValueError` stays catchable as one by
code that used the libraries before these types existed.
"""


class ToolkitError(Exception):
    """Base of every error a user can fix (bad input, missing file, wrong dataset)."""


class UserError(ToolkitError):
    """A request that cannot work as given (e.g. a batch larger than the dataset)."""


class InputError(ToolkitError, ValueError):
    """A library function was given values outside its domain (a fraction above 1, labels of the wrong shape)."""
