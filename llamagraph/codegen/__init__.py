"""Kernels and launches: one lowering per op (``lowering``), kernel builders per family
(``dense``, ``attention``, ``sample``) rendering ``templates/``, launch descriptions as data
(``launch``) and the compiled plan they make up (``compiled``). Imports only llamagraph.ir."""

from .compiled import CompiledPlan, check_capturable
from .launch import Arg, Launch, Shape, Workspace
from .lowering import LOWERINGS, lower_graph
from .render import Kernel, module_source, render

__all__ = ["Arg", "CompiledPlan", "Kernel", "LOWERINGS", "Launch", "Shape", "Workspace", "check_capturable",
           "lower_graph", "module_source", "render"]
