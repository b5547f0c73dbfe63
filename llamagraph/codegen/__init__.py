"""CUDA source generation from jinja templates. Imports only llamagraph.ir."""

from .plan import decode_launches, plan_kernels, plan_source
from .render import Kernel, Launch, module_source, render

__all__ = ["decode_launches", "plan_kernels", "plan_source", "Kernel", "Launch", "module_source", "render"]
