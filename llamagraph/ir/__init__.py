"""The operator IR: configs, typed graphs with per-value layouts, the op registry, the builder,
the text form, liveness and the verifier.

This package imports nothing else from llamagraph.
"""

from .builder import build_graph
from .config import ModelConfig, load_config
from .dtypes import DTYPES, FLOAT_DTYPES, DType
from .errors import BackendError, ConfigError, GraphError, InputError, LlamagraphError, PlanError, WeightError
from .graph import ACTIVATION, INPUT, KV_CACHE, WEIGHT, CacheLayout, Graph, Node, Quant, Shard, Value
from .ops import OPS, OpDef
from .verify import verify

__all__ = [
    "ACTIVATION", "INPUT", "KV_CACHE", "WEIGHT", "DTYPES", "FLOAT_DTYPES", "DType",
    "BackendError", "ConfigError", "GraphError", "InputError", "LlamagraphError", "PlanError", "WeightError",
    "CacheLayout", "Graph", "ModelConfig", "Node", "OPS", "OpDef", "Quant", "Shard", "Value",
    "build_graph", "load_config", "verify",
]
