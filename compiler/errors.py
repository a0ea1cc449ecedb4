"""Exceptions fxforge raises on purpose; each message names what was expected and what was given."""


class FxforgeError(Exception):
    """Base of every error fxforge raises on purpose."""


class PassError(FxforgeError):
    """A pass's precondition or postcondition failed, or a pass broke graph metadata."""


class NumericsError(FxforgeError):
    """Debug mode: a pass or the compiled program changed the graph's numerics beyond tolerance."""


class SignatureMismatch(FxforgeError):
    """An AOT-compiled program was called with inputs it was not compiled for."""


class ArtifactError(FxforgeError):
    """An artifact is corrupt, incomplete, or from an incompatible fxforge/torch/triton version."""


class ConfigError(FxforgeError):
    """An invalid configuration value or pass option."""
