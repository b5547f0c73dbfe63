"""The operator IR: configs, typed graphs, the op registry, the builder and the verifier.

This package imports nothing else from llamagraph.
"""

from .builder import build_graph
from .config import ModelConfig, load_config
from .errors import BackendError, ConfigError, GraphError, InputError, LlamagraphError, WeightError
from .graph import ACTIVATION, INPUT, KV_CACHE, WEIGHT, DTYPE_BYTES, Graph, Node, Value
from .ops import OPS, OpDef
from .verify import verify

__all__ = [
    "ACTIVATION", "INPUT", "KV_CACHE", "WEIGHT", "DTYPE_BYTES",
    "BackendError", "ConfigError", "GraphError", "InputError", "LlamagraphError", "WeightError",
    "Graph", "ModelConfig", "Node", "OPS", "OpDef", "Value",
    "build_graph", "load_config", "verify",
]
