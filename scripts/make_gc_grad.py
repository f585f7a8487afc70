#!/usr/bin/env python3
"""Writes the context-block gradient cases of tests/data/family (needs torch, mmcv-lite 2.2.0,
timm and safetensors; not part of CI: the files are committed).

    python3 scripts/make_gc_grad.py

Each file holds one upstream module's parameters under its own `state_dict` keys, an `input`
and `output` (B, 1, H, W, C) channels last, a random `grad_output`, and the PyTorch autograd
gradients of L = sum(output * grad_output): `grad_input` and `grad.<key>` for every parameter.
Everything is computed in float64 from parameters and inputs that are float32 values (stored
as F32, exactly), so the stored results are the float64 results rounded once.

- gc_grad_mmcv_both: mmcv.cnn.ContextBlock(12, 0.25, 'att', ('channel_add', 'channel_mul'))
- gc_grad_timm_avg: timm.layers.GlobalContext(16, use_attn=False, fuse_add=True,
  fuse_scale=True, rd_ratio=1/4)
"""

import os

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "family")


def randomise(module, gen):
    """Every parameter random and non-trivial (the upstream init zeroes some), as f32 values."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 1.0 / max(1, p.shape[1] if p.dim() > 1 else 1) ** 0.5
            values = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale
            if "norm" in name or name.endswith(".1.weight") or name.endswith(".1.bias"):
                values = values * 0.5 + (1.0 if name.endswith("weight") else 0.0)
            if "conv_mask" in name or "conv_attn" in name:
                values = values * 3.0
            p.copy_(values.float().double())


def case(name, module, shape, meta, seed):
    gen = torch.Generator().manual_seed(seed)
    module = module.double().eval()
    randomise(module, gen)
    b, c, h, w = shape
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5).float().double().requires_grad_(True)
    out = module(x)
    grad_output = torch.randn(out.shape, generator=gen, dtype=torch.float64).float().double()
    (out * grad_output).sum().backward()

    def channels_last(t):
        return t.detach().permute(0, 2, 3, 1).unsqueeze(1).contiguous().float()

    tensors = {
        "input": channels_last(x),
        "output": channels_last(out),
        "grad_output": channels_last(grad_output),
        "grad_input": channels_last(x.grad),
    }
    for key, p in module.named_parameters():
        tensors[key] = p.detach().float().contiguous()
        tensors[f"grad.{key}"] = p.grad.detach().float().contiguous()
    meta = {
        **{k: str(v) for k, v in meta.items()},
        "in_channels": str(c),
        "dims": "2",
        "layout": "B,T,H,W,C",
        "prefix": "",
        "loss": "sum(output * grad_output)",
        "made_by": f"scripts/make_gc_grad.py, torch {torch.__version__}",
    }
    path = os.path.join(OUT, f"{name}.safetensors")
    save_file(tensors, path, metadata=meta)
    print(f"{path}: output max |.| {out.abs().max().item():.3g}")


def main():
    from mmcv.cnn import ContextBlock
    from timm.layers import GlobalContext

    os.makedirs(OUT, exist_ok=True)
    mmcv_block = ContextBlock(12, 0.25, pooling_type="att", fusion_types=("channel_add", "channel_mul"))
    case(
        "gc_grad_mmcv_both",
        mmcv_block,
        (2, 12, 5, 7),
        {
            "block": "context_block",
            "naming": "mmcv",
            "ratio": 0.25,
            "planes": mmcv_block.planes,
            "pooling_type": "att",
            "fusion_types": "channel_add,channel_mul",
            "ln_eps": "1e-05",
        },
        seed=1,
    )
    timm_block = GlobalContext(16, use_attn=False, fuse_add=True, fuse_scale=True, rd_ratio=0.25)
    case(
        "gc_grad_timm_avg",
        timm_block,
        (1, 16, 6, 5),
        {
            "block": "global_context",
            "naming": "timm",
            "use_attn": "false",
            "fuse_add": "true",
            "fuse_scale": "true",
            "rd_channels": timm_block.mlp_add.fc1.out_channels,
            "gate": "sigmoid",
            "ln_eps": "1e-06",
        },
        seed=2,
    )


if __name__ == "__main__":
    main()
