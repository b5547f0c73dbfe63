"""CUDA source generation from jinja templates. Imports only llamagraph.ir."""

from .render import Kernel, module_source, render

__all__ = ["Kernel", "module_source", "render"]
