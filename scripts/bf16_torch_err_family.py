#!/usr/bin/env python3
"""PyTorch's own bf16-autocast error on the vendored timm `NonLocalAttn` cases
(tests/data/family, `block: non_local`), in the format of tests/data/bf16_torch_err.txt: what
the bf16 rules scale on those cases (the shared table lists the AlexHex7-structured cases only).

    /work/venv/bin/python scripts/bf16_torch_err_family.py > tests/data/bf16_torch_err_family.txt

Needs torch, timm and safetensors. Error: max|z - want| / max(1, max|want|) against the stored
float64-made output, z from the module under torch.autocast("cpu", dtype=torch.bfloat16).
"""
import glob
import os

import timm
import torch
from safetensors import safe_open
from timm.layers import NonLocalAttn


def main():
    root = os.path.join(os.path.dirname(__file__), '..', 'tests', 'data', 'family')
    print('# Made by scripts/bf16_torch_err_family.py (torch %s, timm %s): PyTorch\'s bf16-autocast error'
          % (torch.__version__, timm.__version__))
    print('# on the timm NonLocalAttn cases of tests/data/family, as in bf16_torch_err.txt.')
    for path in sorted(glob.glob(os.path.join(root, '*.safetensors'))):
        f = safe_open(path, 'pt')
        meta = f.metadata()
        name = os.path.basename(path)
        if meta.get('block') != 'non_local' or name.startswith('corrupt'):
            continue
        c, ci = int(meta['in_channels']), int(meta['inter_channels'])
        module = NonLocalAttn(c, use_scale=meta['use_scale'] == 'true', rd_channels=ci)
        keys = set(module.state_dict())
        module.load_state_dict({k: f.get_tensor(k) for k in f.keys() if k in keys})
        module.eval()
        x, want = f.get_tensor('input'), f.get_tensor('output').double()
        b, t, h, w, _ = x.shape
        images = x.reshape(b * t, h, w, c).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            z = module(images).float()
        z = z.permute(0, 2, 3, 1).reshape(want.shape).double()
        scale = max(1.0, want.abs().max().item())
        print(f'{name} {((z - want).abs().max() / scale).item():.3e}')


if __name__ == '__main__':
    main()
