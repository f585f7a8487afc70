#!/usr/bin/env python3
"""Makes the criss-cross gradient golden cases in tests/data/family/ with mmcv's own module.

mmcv.ops.CrissCrossAttention (mmcv-lite 2.2.0; its module file is loaded by path, since mmcv.ops'
package init wants the compiled `_ext` that mmcv-lite lacks) runs in float64 with randomised
parameters, applied `recurrence` times; PyTorch autograd differentiates L = sum(output * grad_output).
Inputs and parameters are rounded to float32 first, so the float32 file holds exactly the values
the reference used. Format as /work/shared/golden/grad/*.safetensors: `input`, `output`,
`grad_output`, `grad_input` (B, T=1, H, W, C) channels last, the parameters under their
state_dict keys and their gradients under `grad.<key>`, with PyTorch's shapes.

Usage:  python3 scripts/make_cc_grad.py [OUT_DIR]   (default tests/data/family)
"""
import importlib.util
import os
import sys

import torch
from safetensors.torch import save_file

CASES = [
    # name, B, C, H, W, recurrence, seed
    ("cc_grad_mmcv", 2, 16, 5, 7, 1, 11),
    ("cc_grad_recurrence2", 1, 24, 6, 4, 2, 12),
]


_CLASS = []


def module_class():
    if _CLASS:
        return _CLASS[0]
    import mmcv

    path = os.path.join(mmcv.__path__[0], "ops", "cc_attention.py")
    spec = importlib.util.spec_from_file_location("mmcv_cc_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _CLASS.append(module.CrissCrossAttention)
    return _CLASS[0]


def make(out_dir, name, b, c, h, w, recurrence, seed):
    torch.manual_seed(seed)
    block = module_class()(c)
    with torch.no_grad():
        for conv in (block.query_conv, block.key_conv, block.value_conv):
            conv.weight.mul_(2.0)  # logits of a few units, so the softmax is far from uniform
            conv.bias.uniform_(-0.3, 0.3)
        block.gamma.scale.fill_(0.5 + 0.4 * torch.rand(()).item())
        for p in block.parameters():
            p.copy_(p.float())
    block = block.double()
    x = torch.randn(b, c, h, w).float().double().requires_grad_(True)
    grad_output = torch.randn(b, c, h, w).float().double()
    out = x
    for _ in range(recurrence):
        out = block(out)
    (out * grad_output).sum().backward()

    def clips(t):  # (B, C, H, W) -> (B, 1, H, W, C) float32
        return t.detach().permute(0, 2, 3, 1).unsqueeze(1).float().contiguous()

    tensors = {"input": clips(x), "output": clips(out), "grad_output": clips(grad_output), "grad_input": clips(x.grad)}
    for key, p in block.state_dict().items():
        tensors[key] = p.float().contiguous()
    for key, p in block.named_parameters():
        tensors["grad." + key] = p.grad.float().contiguous()
    metadata = {
        "block": "criss_cross",
        "naming": "mmcv",
        "in_channels": str(c),
        "qk_channels": str(c // 8),
        "recurrence": str(recurrence),
        "prefix": "",
        "dims": "2",
        "layout": "B,T,H,W,C",
        "loss": "sum(output * grad_output)",
        "output_max_abs": f"{out.abs().max().item():.3g}",
        "made_by": f"scripts/make_cc_grad.py, torch {torch.__version__}, mmcv-lite 2.2.0, float64",
    }
    path = os.path.join(out_dir, name + ".safetensors")
    save_file(tensors, path, metadata=metadata)
    print(path, {k: list(v.shape) for k, v in tensors.items()})


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "data", "family")
    os.makedirs(out_dir, exist_ok=True)
    for case in CASES:
        make(out_dir, *case)


if __name__ == "__main__":
    main()
