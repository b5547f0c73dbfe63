"""A/B of the decode attention's split size (attention.DECODE_CHUNK) at tp 1 and tp 2, in one process:
``python tools/tp_chunk_sweep.py CONFIG [CHUNK ...]``. Prints decode tok/s per (chunk, tp) and the
tp2/tp1 ratio; an experiment, not a bench (the bench's tables come from ``llamagraph bench``)."""

import sys

import numpy as np

from llamagraph.bench import bench_llamagraph
from llamagraph.codegen import attention
from llamagraph.ir import load_config


def main() -> None:
    cfg = load_config(sys.argv[1])
    chunks = [int(c) for c in sys.argv[2:]] or [64, 32, 16]
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 128)).tolist()
    for chunk in chunks:
        attention.DECODE_CHUNK = chunk
        speed = {tp: bench_llamagraph(cfg, prompts, 128, "float16", tp=tp)[0].decode_tok_s for tp in (1, 2)}
        print(f"chunk {chunk:3d}: tp1 {speed[1]:7.1f} tok/s, tp2 {speed[2]:7.1f} tok/s, tp2/tp1 {speed[2] / speed[1]:.3f}",
              flush=True)


if __name__ == "__main__":
    main()
