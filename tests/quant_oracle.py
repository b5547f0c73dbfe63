"""The quantization schemes of issue #8 written out again, in torch, from their statement: the
test oracle is HF transformers run with these dequantized weights, so a plan that quantizes any
other way fails the comparison. Kept apart from ``llamagraph.ir.quant`` on purpose."""

import os

import torch
from safetensors.torch import save_file

import models

LINEAR_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
                   "up_proj.weight", "down_proj.weight")


def dequantized_int8(w: torch.Tensor) -> torch.Tensor:
    """s = max|w| / 127 per row; q = clamp(rint(w / s), -127, 127); w' = q * s (zero range: s = 1)."""
    w = w.float()
    s = w.abs().amax(dim=1) / 127.0
    s = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.clamp(torch.round(w / s[:, None]), -127, 127)  # torch.round: half to even
    return q * s[:, None]


def dequantized_int4(w: torch.Tensor, group: int) -> torch.Tensor:
    """Per group of ``group`` columns: s = (max - min) / 15; z = clamp(rint(-min / s), 0, 15);
    q = clamp(rint(w / s) + z, 0, 15); w' = (q - z) * s."""
    w = w.float()
    n, k = w.shape
    group = k if group == -1 else group
    g = w.reshape(n, k // group, group)
    lo, hi = g.amin(dim=2, keepdim=True), g.amax(dim=2, keepdim=True)
    s = (hi - lo) / 15.0
    s = torch.where(s == 0, torch.ones_like(s), s)
    z = torch.clamp(torch.round(-lo / s), 0, 15)
    q = torch.clamp(torch.round(g / s) + z, 0, 15)
    return ((q - z) * s).reshape(n, k)


def write_dequantized(model_dir: str, out_dir: str, scheme: str, group: int = 128) -> str:
    """A copy of an HF checkpoint whose linear weights (and an untied lm_head) are replaced by w'."""
    return write_linear_weights(model_dir, out_dir, lambda w: dequantized_int8(w) if scheme == "int8"
                                else dequantized_int4(w, group))


def write_linear_weights(model_dir: str, out_dir: str, fn) -> str:
    """A copy of an HF checkpoint whose linear weights (and an untied lm_head) w are replaced by fn(w)."""
    sd = {k: v.clone() for k, v in models.hf_state_dict(model_dir).items()}
    for name, w in sd.items():
        if name.endswith(LINEAR_SUFFIXES) or name == "lm_head.weight":
            sd[name] = fn(w).to(w.dtype)
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(model_dir):
        if f.endswith(".json"):
            with open(os.path.join(model_dir, f), "rb") as src, open(os.path.join(out_dir, f), "wb") as dst:
                dst.write(src.read())
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    return out_dir
