"""llamagraph: lower Llama-family models to a fused, memory-planned CUDA execution plan.

    plan = llamagraph.compile("model_dir", dtype="float16", max_batch=2, backend="cuda")
    logits = plan.run([[1, 15043, 29892], [1, 22172]])   # float32 [batch, vocab]
    tokens = plan.generate([[1, 15043]], max_new_tokens=32)
    plan = llamagraph.load("model.llamagraph", "model_dir", backend="cuda")   # a saved plan
    print(llamagraph.bisect("model_dir", [1, 15043], backend="cuda").table())  # where it departs from HF
"""

from .api import Plan, bind, compile, load, logits_error
from .bisect import BisectResult, bisect  # the function shadows the submodule's name here
from .codegen.compiled import CompiledPlan
from .compiler import compile_graph, compile_plan
from .ir.errors import BackendError, ConfigError, InputError, LlamagraphError, PlanError, WeightError
from .runtime.weights import random_weights

__all__ = [
    "logits_error",
    "BackendError", "ConfigError", "InputError", "LlamagraphError", "PlanError", "WeightError",
    "BisectResult", "CompiledPlan", "Plan", "bind", "bisect", "compile", "compile_graph", "compile_plan", "load",
    "random_weights",
]
