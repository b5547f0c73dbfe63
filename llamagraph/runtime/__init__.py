"""Executors of compiled plans: ``reference`` (numpy, the planned graph through the registry's
references) and ``cuda`` (the plan's launch lists through cupy, decode captured as CUDA graphs),
plus checkpoint loading (``weights``). Imports ``llamagraph.ir`` and the plan types of
``llamagraph.codegen``; never the passes or the compiler, and no op by name."""
