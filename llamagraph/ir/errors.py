"""User-facing errors.

Every error a user can cause (bad config, bad weights, bad tokens, no GPU) is a
``LlamagraphError`` whose message is one line naming the file, key or value at fault.
The CLI prints that line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class LlamagraphError(Exception):
    """Base class of all user-facing errors."""


class ConfigError(LlamagraphError):
    """A model config is malformed, inconsistent, or asks for math we do not implement."""


class WeightError(LlamagraphError):
    """A checkpoint is missing a tensor, has one of the wrong shape, or cannot be read."""


class InputError(LlamagraphError):
    """Tokens, batch sizes or sampling parameters passed to a plan are out of range."""


class BackendError(LlamagraphError):
    """The requested backend cannot run here (no GPU, no cupy, no compiler)."""


class GraphError(Exception):
    """The verifier found an ill-formed graph: a compiler bug, not a user error."""


class PlanError(LlamagraphError):
    """A compiled plan cannot be built, read or captured: a node with no kernel for its layout,
    a launch list that is not graph-safe, or a plan directory that is missing or inconsistent."""
