"""llamagraph: lower Llama-family models to a fused, memory-planned CUDA execution plan."""
