"""User-facing errors. Each message names the problem and the fix; the CLI and the app show
the message alone (no traceback)."""


class LLRCError(Exception):
    """Base class: something the user can fix."""


class ModelLoadError(LLRCError):
    pass


class UnsupportedModelError(LLRCError):
    pass


class CalibrationError(LLRCError):
    pass


class DecompositionError(LLRCError):
    pass


class TrainingError(LLRCError):
    pass


class Stopped(Exception):
    """The one stop result: the caller asked to stop and there is no valid result to return.

    A selector asked to stop returns a valid plan marked ``meta["stopped"]`` when it has one
    (the learned methods: the masks so far, landed on the budget), and raises ``Stopped`` when
    it has none (STRS before its table is complete). Jobs, the comparison grid and the pages
    report both as "stopped", never as an error.
    """
