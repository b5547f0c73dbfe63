"""llamagraph: lower Llama-family models to a fused, memory-planned CUDA execution plan.

    plan = llamagraph.compile("model_dir", dtype="float16", max_batch=2, backend="cuda")
    logits = plan.run([[1, 15043, 29892], [1, 22172]])   # float32 [batch, vocab]
    tokens = plan.generate([[1, 15043]], max_new_tokens=32)
"""

from .ir.errors import BackendError, ConfigError, InputError, LlamagraphError, WeightError
from .runtime.plan import Plan, compile, compile_graph
from .runtime.weights import random_weights

__all__ = [
    "BackendError", "ConfigError", "InputError", "LlamagraphError", "WeightError",
    "Plan", "compile", "compile_graph", "random_weights",
]
