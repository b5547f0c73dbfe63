"""CUDA source generation from jinja templates. Imports only llamagraph.ir."""

from .render import Kernel, Launch, module_source, render

__all__ = ["Kernel", "Launch", "module_source", "render"]
