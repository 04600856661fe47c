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
