# Kernel templates (CUDA text only). Installed as the package data llamagraph.templates.
