#!/usr/bin/env python3
"""Randomised differential sweep of the crate against the upstream PyTorch implementations.

Draws random configurations within what the crate supports, writes one golden-format file per
case (the upstream module itself, in float64, on a float32-representable input; parameters
randomised as `make_family.py` does and stored in F32/F16/BF16/F64), then runs
`target/release/examples/golden` (and, with `--candle`, `candle_golden` on the non-local cases)
on every file and prints a summary: passes, and every failure with its configuration.

    /work/venv/bin/python scripts/sweep_upstream.py --count 240 --seed 1 --out /tmp/sweep/fwd
    /work/venv/bin/python scripts/sweep_upstream.py --count 60 --seed 2 --grad --out /tmp/sweep/grad
    /work/venv/bin/python scripts/sweep_upstream.py --count 240 --seed 1 --out /tmp/sweep/fwd --only 17,42
    /work/venv/bin/python scripts/sweep_upstream.py --out /tmp/sweep/min --case '{"block": "nl", ...}'
    /work/venv/bin/python scripts/sweep_upstream.py --out /tmp/sweep/fwd --check-only --candle
    /work/venv/bin/python scripts/sweep_upstream.py --count 240 --seed 1 --out /tmp/sweep/fwd --candle --pth --bf16 --threads 1,3
    /work/venv/bin/python scripts/sweep_upstream.py --torch-f32 /tmp/sweep/grad/grad_s2_0028_cc.safetensors

`--pth` also checks each case through a `.pth` copy of its parameters (`golden --weights`),
`--bf16` runs `golden --precision bf16` against PyTorch's bf16-autocast error on each non-local
case, `--threads` compares output bits across RAYON_NUM_THREADS, `--torch-f32` prints PyTorch's
own float32 error per tensor of a case (to tell a crate error from an ill-conditioned case).

Blocks (`--blocks`, default all, drawn round-robin):
- `nl`: AlexHex7/Non-local_pytorch `NONLocalBlock1D/2D/3D` (keys `naming=alexhex7`), the four
  modes, sub-sampling on/off (sometimes with the max-pool layer replaced by another kernel, as
  the crate allows any kernel), BatchNorm on/off, any `inter_channels`. AlexHex7 has no
  `use_scale`. Its source is not a package: it is read at run time from a checkout given by
  $ALEXHEX7_DIR (a work tree, or a bare git directory read with `git show HEAD:lib/...`), e.g.
  `git clone https://github.com/AlexHex7/Non-local_pytorch /tmp/Non-local_pytorch`.
- `mmcv`: mmcv `NonLocal1d/2d/3d` (`reduction`, `use_scale`, `sub_sample` with its fixed
  kernel per dims, `norm_cfg` BN with its eps or none, `mode`).
- `timm_nl`: timm `NonLocalAttn` (`use_scale`, `rd_ratio`/`rd_divisor` or `rd_channels`).
- `gc`: mmcv `ContextBlock` (`ratio`, `pooling_type`, `fusion_types`) and timm
  `GlobalContext` (`use_attn`, `fuse_add`, `fuse_scale`, `rd_ratio`/`rd_divisor`/`rd_channels`).
- `cc`: mmcv `CrissCrossAttention` (in_channels >= 8), `recurrence` 1-3, any H, W >= 1.
- `dnl`: mmseg `DisentangledNonLocal2d` (embedded Gaussian / dot product, `reduction`,
  `use_scale`, `temperature`, `norm_cfg`); no sub-sampling (the crate has none).

Small non-local cases (`nl`, `mmcv`, `timm_nl`) also hold the `attention` map. With `--grad`
the cases are gradient cases instead: `grad_output`, `grad_input` and `grad.<key>` for every
parameter (the full checkpoint key, prefix included), float64 autograd of
sum(output * grad_output), BatchNorm in eval form.

Notes on reading failures: a case is ill-conditioned when PyTorch's own float32 run is near or
past the tolerance too (the summary says so); in gradient cases the key bias of every softmax
mode (`phi*.bias`, `p.bias`, `key_conv.bias`) has gradient exactly 0 (the crate returns 0;
PyTorch's float32 run gives rounding noise, measured against an absolute 1e-4). mmcv's concatenation divides a ReLU output in place,
which autograd refuses: gradient cases compute the same arithmetic out of place.

Case i of a run depends only on (seed, i, --grad, block list), so `--only` regenerates it.
Each file's metadata `sweep_case` holds its configuration as JSON; `--case` writes one case
from such a JSON (edit it to minimise a failure). Files go to --out (keep it outside the repo).
Needs the team venv (torch, timm, mmengine, mmcv-lite 2.2.0), the mmsegmentation 1.2.2 wheel
(see family_upstream.py) and `cargo build --release --example golden` (and
`--features candle --example candle_golden` for `--candle`).
"""

import argparse
import copy
import glob
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import types
import zlib

import torch
from torch import nn
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import family_upstream  # noqa: E402
import make_family  # noqa: E402  (sort_header, surrounding_model, versions, randomise_norm)

ALL_BLOCKS = ["nl", "mmcv", "timm_nl", "gc", "cc", "dnl"]
NON_LOCAL_BLOCKS = {"nl", "mmcv", "timm_nl"}  # what candle_golden runs
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64}
LOSS = "sum(output * grad_output)"
ATTENTION_MAX = 300000  # attention elements (B·N·M) up to which a forward case stores the map


# ---------------------------------------------------------------------------------------------
# AlexHex7's Non-local_pytorch, read from a checkout at run time (never stored here).

_ALEX = {}


def alexhex7_class(mode, dims):
    if mode not in _ALEX:
        root = os.environ.get("ALEXHEX7_DIR", "")
        rel = f"lib/non_local_{mode}.py"
        if root and os.path.isfile(os.path.join(root, rel)):
            src = open(os.path.join(root, rel)).read()
        elif root and os.path.isdir(root):
            src = subprocess.run(["git", "--git-dir", root, "show", f"HEAD:{rel}"], check=True,
                                 capture_output=True, text=True).stdout
        else:
            raise FileNotFoundError("set ALEXHEX7_DIR to a checkout of github.com/AlexHex7/Non-local_pytorch "
                                    "(work tree or bare git dir) for the `nl` block")
        ns = {"__name__": f"alexhex7_{mode}"}
        exec(compile(src, f"AlexHex7:{rel}", "exec"), ns)
        _ALEX[mode] = ns
    return _ALEX[mode][f"NONLocalBlock{dims}D"]


# ---------------------------------------------------------------------------------------------
# Drawing configurations.

CHANNELS = [1, 2, 3, 4, 5, 7, 8, 9, 11, 12, 15, 16, 17, 24, 31, 32, 33, 48, 64, 96]
CHANNELS_W = [3, 2, 4, 3, 4, 4, 4, 3, 2, 3, 2, 4, 2, 3, 2, 3, 1, 2, 2, 1]
BIG_CHANNELS = [8, 16, 24, 31, 32, 33, 48, 64, 65, 96, 128, 160, 256]
MODES = ["embedded_gaussian", "dot_product", "concatenation", "gaussian"]


def draw_channels(r, lo=1):
    while True:
        c = r.choices(CHANNELS, CHANNELS_W)[0]
        if c >= lo:
            return c


def draw_size(r, k, hi=11, big=False):
    """A spatial size >= k (the pool kernel along that axis, 1 without pooling): often k, k+1,
    2k-1, 2k+1 (sizes the max-pool floors), else anything up to hi (`big`: mostly hi/3 to hi)."""
    if big and r.random() < 0.8:
        return r.randint(max(k, hi // 3), max(k, hi))
    if k > 1:
        opts = [k, k + 1, 2 * k - 1, 2 * k + 1, r.randint(k, max(k, hi)), r.randint(k, max(k, hi))]
    else:
        opts = [1, 2, r.randint(1, hi), r.randint(3, max(3, hi)), r.randint(3, max(3, hi))]
    return max(k, r.choice(opts))


def draw_dtype(r):
    return r.choices(["f32", "f16", "bf16", "f64"], [6, 2, 2, 1])[0]


def draw_logit_std(r):
    """The target standard deviation of the (final, scaled) logits: softmax neither flat nor one-hot,
    sometimes large."""
    u = r.random()
    return r.uniform(0.5, 4.0) if u < 0.8 else r.uniform(6.0, 12.0) if u < 0.95 else r.uniform(20.0, 60.0)


def draw_prefix(r):
    if r.random() < 0.8:
        return ""
    return r.choice(["backbone.layer3.1.non_local_block.", "module.backbone.layer2.0.nl.", "decode_head.head.block.",
                     "model.blocks.4.attn."])


def shape_for(r, dims, kernel, grad, big):
    """(B, T, H, W) for a block of `dims` whose pool kernel is `kernel` (1s without pooling);
    `big`: sizes past the crate's query/key tiles (256/252) and its small-product threshold."""
    kt, kh, kw = kernel
    b = r.choice([1, 1, 2, 2, 3])
    if dims == 1:
        hi = (300 if grad else 1200) if big else (20 if grad else 40)
        return [b, 1, 1, draw_size(r, kw, hi, big)]
    if dims == 2:
        hi = (24 if grad else 48) if big else (8 if grad else 11)
        return [b, 1, draw_size(r, kh, hi, big), draw_size(r, kw, hi, big)]
    hi = (12 if grad else 24) if big else (6 if grad else 9)
    return [b, draw_size(r, kt, 8 if big else 4, big), draw_size(r, kh, hi, big), draw_size(r, kw, hi, big)]


def cap_shape(shape, limit, kernel):
    """Shrinks the largest of T, H, W (never below its pool kernel, nor below 1) until T·H·W <= limit."""
    b, *dims = shape
    while dims[0] * dims[1] * dims[2] > limit:
        i = max((i for i in range(3) if dims[i] > max(kernel[i], 1)), key=lambda i: dims[i], default=None)
        if i is None:
            break
        dims[i] -= 1
    return [b, *dims]


def draw(block, r, grad):
    """A case configuration (JSON-able dict) for `block`."""
    cfg = dict(block=block, param_dtype=draw_dtype(r), prefix=draw_prefix(r), logit_std=draw_logit_std(r))
    big = r.random() < 0.3
    if big:
        cfg["size"] = "large"
    if block in ("nl", "mmcv"):
        dims = r.choice([1, 2, 3, 3])
        mode = r.choice(MODES)
        c = r.choice(BIG_CHANNELS) if big else draw_channels(r)
        sub = r.random() < 0.6
        kernel = [1, 1, 1]
        if sub:
            kernel = {1: [1, 1, 2], 2: [1, 2, 2], 3: [1, 2, 2]}[dims]
            if block == "nl" and r.random() < 0.35:  # the crate takes any kernel: replace the pool layer
                if dims == 1:
                    kernel = [1, 1, r.choice([1, 3, 4])]
                elif dims == 2:
                    kernel = [1, r.choice([1, 2, 3]), r.choice([1, 2, 3])]
                else:
                    kernel = [r.choice([1, 2, 3]), r.choice([1, 2, 3]), r.choice([1, 2, 3])]
        cfg.update(dims=dims, mode=mode, in_channels=c, sub_sample=sub, kernel=kernel, bn=r.random() < 0.6)
        if sub and r.random() < 0.2:
            cfg["ties"] = True  # pairs of identical positions: exact max-pool ties (first wins in PyTorch)
        if block == "nl":
            ci = None if r.random() < 0.5 else r.choice([1, 1, 3, 5, max(c // 2 + 1, 1), c, 2 * c + 1, r.randint(1, 40)])
            cfg.update(inter_channels=ci)
        else:
            cfg.update(reduction=r.choice([1, 2, 2, 2, 3, 4, 8, max(c, 1), c + 1]), use_scale=r.random() < 0.5,
                       bn_eps=r.choice([1e-5, 1e-5, 1e-3, 1e-4]))
        limit = (700 if grad else 3000) if big else (120 if grad else 500)
    elif block == "timm_nl":
        c = r.choice(BIG_CHANNELS) if big else draw_channels(r)
        u = r.random()
        if u < 0.4:
            rd = dict(rd_ratio=r.choice([1 / 8, 1 / 4, 1 / 2]), rd_divisor=r.choice([8, 8, 1, 2, 4]))
        else:
            rd = dict(rd_channels=r.choice([1, 2, 3, 5, 7, 8, 16, max(c // 2, 1)]))
        cfg.update(in_channels=c, use_scale=r.random() < 0.6, **rd)
        kernel, dims, limit = [1, 1, 1], 2, ((700 if grad else 2500) if big else (150 if grad else 400))
    elif block == "gc":
        c = draw_channels(r)
        if r.random() < 0.5:
            ratios = [x for x in [1 / 16, 1 / 8, 1 / 4, 0.3, 1 / 3, 3 / 8, 0.5, 0.29, 1.0, 1.5] if int(c * x) >= 1]
            fusion = r.choice([["channel_add"], ["channel_mul"], ["channel_add", "channel_mul"],
                               ["channel_mul", "channel_add"]])
            cfg.update(impl="mmcv", in_channels=c, ratio=r.choice(ratios), pooling_type=r.choice(["att", "avg"]),
                       fusion_types=fusion)
        else:
            fa, fs = r.choice([(True, True), (True, False), (False, True)])
            if r.random() < 0.5:
                rd = dict(rd_ratio=r.choice([1 / 8, 1 / 4, 1 / 16, 0.3, 0.5]), rd_divisor=r.choice([1, 1, 2, 4, 8]))
            else:
                rd = dict(rd_channels=r.choice([1, 2, 3, 5, 8, max(c // 4, 1), c]))
            cfg.update(impl="timm", in_channels=c, use_attn=r.random() < 0.6, fuse_add=fa, fuse_scale=fs, **rd)
        kernel, dims, limit = [1, 1, 1], 2, ((1500 if grad else 4096) if big else (150 if grad else 400))
    elif block == "cc":
        c = r.choice(BIG_CHANNELS) if big else draw_channels(r, lo=8)
        cfg.update(in_channels=c, recurrence=r.choice([1, 1, 2, 2, 3]))
        kernel, dims, limit = [1, 1, 1], 2, ((600 if grad else 2304) if big else (100 if grad else 300))
    elif block == "dnl":
        c = r.choice(BIG_CHANNELS) if big else draw_channels(r)
        cfg.update(in_channels=c, mode=r.choice(["embedded_gaussian", "embedded_gaussian", "dot_product"]),
                   reduction=r.choice([1, 2, 2, 3, 4, 8, c]), use_scale=r.random() < 0.6,
                   temperature=r.choice([0.05, 0.05, 0.1, 0.5, 1.0, 2.0]), bn=r.random() < 0.6,
                   bn_eps=r.choice([1e-5, 1e-3]))
        kernel, dims, limit = [1, 1, 1], 2, ((600 if grad else 2500) if big else (120 if grad else 300))
    else:
        raise ValueError(block)
    shape = cap_shape(shape_for(r, dims, kernel, grad, big), limit, kernel)
    if cfg.get("mode") == "concatenation":  # upstream materialises (B, 2C', N, M): keep it small
        ci = cfg.get("inter_channels") or max(cfg["in_channels"] // cfg.get("reduction", 2), 1)
        while True:
            n = shape[1] * shape[2] * shape[3]
            m = math.prod(d // k for d, k in zip(shape[1:], kernel))
            if shape[0] * n * m * 2 * ci <= 2e7 or n <= 1:
                break
            shape = cap_shape(shape, n - 1, kernel)
            if shape[1] * shape[2] * shape[3] == n:
                break
    cfg["shape"] = shape
    return cfg


# ---------------------------------------------------------------------------------------------
# Building the upstream module and the metadata.


def mmcv_norm(dims, eps):
    return dict(type={1: "BN1d", 2: "BN", 3: "BN3d"}[dims], eps=eps)


def build(cfg):
    """(module, metadata, logit factor) for a case configuration."""
    block = cfg["block"]
    prefix = cfg.get("prefix", "")
    if block == "nl":
        cls = alexhex7_class(cfg["mode"], cfg["dims"])
        m = cls(cfg["in_channels"], inter_channels=cfg["inter_channels"], sub_sample=cfg["sub_sample"], bn_layer=cfg["bn"])
        if cfg["sub_sample"]:
            k = cfg["kernel"]
            pool = {1: lambda: nn.MaxPool1d(k[2]), 2: lambda: nn.MaxPool2d((k[1], k[2])), 3: lambda: nn.MaxPool3d(tuple(k))}
            p = pool[cfg["dims"]]()
            m.g[1] = p
            if cfg["mode"] == "gaussian":
                m.phi = p
            else:
                m.phi[1] = p
        ci = m.inter_channels
        meta = dict(mode=cfg["mode"], in_channels=str(cfg["in_channels"]), inter_channels=str(ci),
                    sub_sample=",".join(map(str, cfg["kernel"])) if cfg["sub_sample"] else "none", use_scale="false",
                    bn_layer=make_family.b(cfg["bn"]), bn_eps="1e-05", naming="alexhex7", prefix=prefix,
                    dims=str(cfg["dims"]), layout="B,T,H,W,C")
        return m, meta, 1.0
    if block == "mmcv":
        from mmcv.cnn import NonLocal1d, NonLocal2d, NonLocal3d

        cls = {1: NonLocal1d, 2: NonLocal2d, 3: NonLocal3d}[cfg["dims"]]
        norm = mmcv_norm(cfg["dims"], cfg["bn_eps"]) if cfg["bn"] else None
        m = cls(cfg["in_channels"], sub_sample=cfg["sub_sample"], reduction=cfg["reduction"], use_scale=cfg["use_scale"],
                norm_cfg=norm, mode=cfg["mode"])
        ci = m.inter_channels
        kernel = {1: "1,1,2", 2: "1,2,2", 3: "1,2,2"}[cfg["dims"]]
        meta = dict(mode=cfg["mode"], in_channels=str(cfg["in_channels"]), inter_channels=str(ci),
                    sub_sample=kernel if cfg["sub_sample"] else "none", use_scale=make_family.b(cfg["use_scale"]),
                    bn_layer=make_family.b(cfg["bn"]), bn_eps=repr(cfg["bn_eps"]), naming="mmcv", prefix=prefix,
                    dims=str(cfg["dims"]), layout="B,T,H,W,C")
        factor = 1 / math.sqrt(ci) if cfg["use_scale"] and cfg["mode"] == "embedded_gaussian" else 1.0
        return m, meta, factor
    if block == "timm_nl":
        from timm.layers import NonLocalAttn

        kw = {k: cfg[k] for k in ("rd_ratio", "rd_divisor", "rd_channels") if k in cfg}
        m = NonLocalAttn(cfg["in_channels"], use_scale=cfg["use_scale"], **kw)
        ci = m.t.out_channels
        meta = dict(block="non_local", naming="timm", mode="embedded_gaussian", in_channels=str(cfg["in_channels"]),
                    inter_channels=str(ci), sub_sample="none", use_scale=make_family.b(cfg["use_scale"]),
                    logit_scale=repr(float(m.scale)), bn_layer="true", bn_eps="1e-05", prefix=prefix, dims="2",
                    layout="B,T,H,W,C")
        return m, meta, float(m.scale)
    if block == "gc" and cfg["impl"] == "mmcv":
        from mmcv.cnn import ContextBlock

        m = ContextBlock(cfg["in_channels"], cfg["ratio"], cfg["pooling_type"], tuple(cfg["fusion_types"]))
        meta = dict(block="context_block", naming="mmcv", dims="2", layout="B,T,H,W,C", prefix=prefix,
                    in_channels=str(cfg["in_channels"]), ratio=repr(cfg["ratio"]), planes=str(m.planes),
                    pooling_type=cfg["pooling_type"], fusion_types=",".join(cfg["fusion_types"]), ln_eps="1e-05")
        return m, meta, 1.0
    if block == "gc":
        from timm.layers import GlobalContext

        kw = {k: cfg[k] for k in ("rd_ratio", "rd_divisor", "rd_channels") if k in cfg}
        m = GlobalContext(cfg["in_channels"], use_attn=cfg["use_attn"], fuse_add=cfg["fuse_add"],
                          fuse_scale=cfg["fuse_scale"], **kw)
        mlp = m.mlp_add if m.mlp_add is not None else m.mlp_scale
        meta = dict(block="global_context", naming="timm", dims="2", layout="B,T,H,W,C", prefix=prefix,
                    in_channels=str(cfg["in_channels"]), use_attn=make_family.b(cfg["use_attn"]),
                    fuse_add=make_family.b(cfg["fuse_add"]), fuse_scale=make_family.b(cfg["fuse_scale"]),
                    rd_channels=str(mlp.fc1.out_channels), gate="sigmoid", ln_eps="1e-06")
        return m, meta, 1.0
    if block == "cc":
        m = family_upstream.criss_cross_attention()(cfg["in_channels"])
        meta = dict(block="criss_cross", naming="mmcv", dims="2", layout="B,T,H,W,C", prefix=prefix,
                    in_channels=str(cfg["in_channels"]), qk_channels=str(m.query_conv.out_channels),
                    recurrence=str(cfg["recurrence"]))
        return m, meta, 1.0
    if block == "dnl":
        dnl = family_upstream.disentangled_non_local()
        norm = dict(type="BN", eps=cfg["bn_eps"]) if cfg["bn"] else None
        m = dnl(cfg["in_channels"], reduction=cfg["reduction"], use_scale=cfg["use_scale"], norm_cfg=norm,
                mode=cfg["mode"], temperature=cfg["temperature"])
        ci = m.inter_channels
        meta = dict(block="disentangled", naming="mmseg", dims="2", layout="B,T,H,W,C", prefix=prefix,
                    in_channels=str(cfg["in_channels"]), mode=cfg["mode"], inter_channels=str(ci), sub_sample="none",
                    use_scale=make_family.b(cfg["use_scale"]), temperature=repr(cfg["temperature"]),
                    bn_layer=make_family.b(cfg["bn"]), bn_eps=repr(cfg["bn_eps"]))
        factor = (1 / math.sqrt(ci) if cfg["use_scale"] else 1.0) / cfg["temperature"]
        return m, meta, factor if cfg["mode"] == "embedded_gaussian" else 1.0
    raise ValueError(block)


def randomise(module, gen, cfg, factor, qk_width, x_var):
    """Every parameter and buffer non-trivial (make_family.randomise, for every conv and norm rank);
    the attention projections scaled so that the final logits have about `logit_std`."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def unif(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)

    s = cfg.get("logit_std", 2.0)
    qk_gain = 1.0
    if qk_width:
        # logit ≈ factor · Σ_k θ_k φ_k, θ_k with variance gain²·(x_var + 0.09): std ≈ factor·√C'·gain²·(x_var+0.09)
        qk_gain = math.sqrt(s / (factor * math.sqrt(qk_width) * (x_var + 0.09)))
    with torch.no_grad():
        for name, m in module.named_modules():
            top = name.split(".")[0]
            if isinstance(m, nn.modules.conv._ConvNd):
                fan_in = m.weight[0].numel()
                gain, bias = 1.0, 0.3
                if top in ("theta", "phi", "t", "p", "query_conv", "key_conv"):
                    gain, bias = qk_gain, 0.3 * qk_gain
                if top in ("conv_mask", "conv_attn"):
                    gain = 1.5
                m.weight.copy_(randn(*m.weight.shape) * gain / fan_in**0.5)
                if m.bias is not None:
                    m.bias.copy_(bias * randn(*m.bias.shape))
            else:
                make_family.randomise_norm(m, randn, unif)


def qk_width(cfg, module):
    """The width of the logits' dot product (0: no scaled projection to tune)."""
    block = cfg["block"]
    if block in ("nl", "mmcv", "dnl") and cfg["mode"] == "embedded_gaussian":
        return module.inter_channels
    if block == "timm_nl":
        return module.t.out_channels
    if block == "cc":
        return module.query_conv.out_channels
    return 0


# layout: module input (B, C, ...) for dims 1/2/3 <-> (B, T, H, W, C)
def to_module(x5, dims):
    x = x5.permute(0, 4, 1, 2, 3)
    if dims == 2:
        x = x[:, :, 0]
    elif dims == 1:
        x = x[:, :, 0, 0]
    return x.contiguous()


def from_module(x, dims):
    if dims == 2:
        x = x.unsqueeze(2)
    elif dims == 1:
        x = x.unsqueeze(2).unsqueeze(2)
    return x.permute(0, 2, 3, 4, 1).contiguous()


def dims_of(cfg):
    return cfg.get("dims", 2)


def run_module(module, cfg, x):
    reps = cfg.get("recurrence", 1) if cfg["block"] == "cc" else 1
    for _ in range(reps):
        x = module(x)
    return x


def attention_of(module, cfg, x):
    """The upstream module's normalised pairwise weights (B, N, M), or None."""
    block = cfg["block"]
    with torch.no_grad():
        if block == "nl":
            return module(x, return_nl_map=True)[1]
        if block == "mmcv":
            got = {}
            orig = getattr(module, cfg["mode"])

            def hook(a, b):
                got["w"] = orig(a, b)
                return got["w"]

            setattr(module, cfg["mode"], hook)
            try:
                module(x)
            finally:
                delattr(module, cfg["mode"])
            return got["w"]
        if block == "timm_nl":
            # NonLocalAttn computes it inline: softmax(t(x)ᵀ p(x) · scale) over the keys
            t = module.t(x).flatten(2).transpose(1, 2)
            p = module.p(x).flatten(2)
            return torch.softmax(torch.bmm(t, p) * module.scale, dim=2)
    return None


def make_case(cfg, seed_text, grad):
    gen = torch.Generator().manual_seed(zlib.crc32(seed_text.encode()))
    module, meta, factor = build(cfg)
    module = module.double().eval()
    dims = dims_of(cfg)
    b, t, h, w = cfg["shape"]
    c = cfg["in_channels"]
    gauss = cfg.get("mode") == "gaussian"
    # Gaussian: logits are x_iᵀx_j, so scale the input to give them about logit_std
    sigma = math.sqrt(cfg.get("logit_std", 2.0) / c) if gauss else 1.2
    x5 = (torch.randn(b, t, h, w, c, generator=gen) + 0.25 * torch.randn(1, 1, 1, 1, c, generator=gen)) * sigma
    if cfg.get("ties"):
        # every odd position along the last pooled axis repeats the one before it
        axis = 3 if cfg["kernel"][2] > 1 else 2 if cfg["kernel"][1] > 1 else 1
        src = [slice(None)] * 5
        dst = [slice(None)] * 5
        n = x5.shape[axis] // 2
        src[axis], dst[axis] = slice(0, 2 * n, 2), slice(1, 2 * n, 2)
        x5[tuple(dst)] = x5[tuple(src)]
    x5 = x5.float()
    randomise(module, gen, cfg, factor, qk_width(cfg, module), 1.2**2 + 0.09)
    store = DTYPES[cfg["param_dtype"]]
    make_family.round_params(module, torch.float32 if store == torch.float64 else store)
    x = to_module(x5.double(), dims)
    tensors = {}
    state = module.state_dict()
    for k, v in state.items():
        tensors[k] = (v.to(store) if v.is_floating_point() else v.to(torch.int64)).contiguous()
    prefix = cfg.get("prefix", "")
    grads = {}
    if grad:
        if cfg["block"] == "mmcv" and cfg["mode"] == "concatenation":
            # mmcv divides the ReLU output in place (`pairwise_weight /= M`), which autograd refuses;
            # the same arithmetic out of place, for the gradients only
            def concatenation(self, theta_x, phi_x):
                h, w = theta_x.size(2), phi_x.size(3)
                f = self.concat_project(torch.cat([theta_x.repeat(1, 1, 1, w), phi_x.repeat(1, 1, h, 1)], dim=1))
                n, _, h, w = f.size()
                return f.view(n, h, w) / w

            module.concatenation = types.MethodType(concatenation, module)  # (deepcopy rebinds it)
        xg = x.clone().requires_grad_(True)
        out = run_module(module, cfg, xg)
        gout = torch.randn(out.shape, generator=gen, dtype=torch.float64).float().double()
        params = dict(module.named_parameters())
        gs = torch.autograd.grad((out * gout).sum(), [xg] + list(params.values()))
        out = out.detach()
        grads["grad_output"] = from_module(gout, dims).float()
        grads["grad_input"] = from_module(gs[0], dims).float()
        for (k, _), g in zip(params.items(), gs[1:]):
            grads[f"grad.{prefix}{k}"] = g.float().contiguous()
        # PyTorch's own float32 run, by the checker's criterion (max over tensors of err/tol)
        m32 = copy.deepcopy(module).float()
        x32 = x.float().clone().requires_grad_(True)
        o32 = run_module(m32, cfg, x32)
        g32 = torch.autograd.grad((o32 * gout.float()).sum(), [x32] + list(dict(m32.named_parameters()).values()))
        ratio = (o32.detach().double() - out).abs().max().item() / (1e-4 * max(1.0, out.abs().max().item()))
        for a, want in zip(g32, gs):
            ratio = max(ratio, (a.double() - want).abs().max().item() / (1e-4 * max(1.0, want.abs().max().item())))
        meta["torch_f32_err_over_tol"] = f"{ratio:.3g}"
        meta["loss"] = LOSS
        meta["batchnorm"] = "inference (frozen statistics)"
    else:
        with torch.no_grad():
            out = run_module(module, cfg, x)
            m32 = copy.deepcopy(module).float()
            out32 = run_module(m32, cfg, x.float())
        meta["torch_f32_max_abs_err"] = f"{(out32.double() - out).abs().max().item():.3g}"
        if cfg["block"] in NON_LOCAL_BLOCKS:
            # PyTorch's bf16-autocast error relative to max(1, max|out|): the bf16 contract's reference
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                obf = run_module(m32, cfg, x.float())
            scale = max(1.0, out.abs().max().item())
            meta["torch_bf16_err"] = f"{(obf.double() - out).abs().max().item() / scale:.4g}"
        if cfg["block"] in NON_LOCAL_BLOCKS:
            n = t * h * w
            att = attention_of(module, cfg, x)
            if att is not None and att.numel() <= ATTENTION_MAX:
                assert att.shape[:2] == (b, n), (att.shape, b, n)
                tensors["attention"] = att.float().contiguous()
    meta["output_max_abs"] = f"{out.abs().max().item():.3g}"
    meta["made_by"] = f"scripts/sweep_upstream.py ({make_family.versions()})"
    meta["sweep_case"] = json.dumps(cfg, sort_keys=True)
    if prefix:
        params = {prefix + k: v for k, v in tensors.items() if k != "attention"}
        rest = {k: v for k, v in tensors.items() if k == "attention"}
        tensors = {**make_family.surrounding_model(prefix, gen, dict(state)), **params, **rest}
    tensors.update(grads)
    tensors["input"] = x5
    tensors["output"] = from_module(out, dims).float()
    return tensors, meta


def describe(cfg):
    skip = ("block", "shape", "logit_std")
    parts = [f"{k}={v}" for k, v in sorted(cfg.items()) if k not in skip and v not in ("", None)]
    return f"shape(B,T,H,W)={cfg['shape']} logit_std={cfg.get('logit_std', 0):.2f} " + " ".join(parts)


CASE_KEYS = ("input", "output", "attention", "grad_output", "grad_input")


def write_case(out_dir, name, cfg, seed_text, grad, pth=False):
    tensors, meta = make_case(cfg, seed_text, grad)
    path = os.path.join(out_dir, name + ".safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=meta)
    make_family.sort_header(path)
    if pth:
        # the same parameters (and unrelated tensors) as a torch checkpoint, in one of the layouts
        # checkpoints come in; `golden --weights` reads them from there
        r = random.Random(seed_text + ":pth")
        sd = {k: v for k, v in tensors.items() if k not in CASE_KEYS and not k.startswith("grad.")}
        wrap = r.choice(["", "state_dict", "model"])
        obj = {wrap: sd, "epoch": 3} if wrap else sd
        legacy = r.random() < 0.3
        torch.save(obj, os.path.join(out_dir, name + ".pth"), _use_new_zipfile_serialization=not legacy)
    return path, meta


# ---------------------------------------------------------------------------------------------
# Running the checkers.

LINE = re.compile(r"^(?P<path>\S+\.safetensors): (?P<rest>.*) (?P<verdict>PASS|FAIL)$")


def run_checker(binary, files, timeout, threads=None, weights=None, extra=()):
    """{path: (verdict, text)}; a crash or hang of a batch reruns its files one at a time."""
    results = {}
    env = dict(os.environ)
    if threads:
        env["RAYON_NUM_THREADS"] = str(threads)

    def once(batch, t):
        try:
            opts = (["--weights", weights] if weights else []) + list(extra)
            p = subprocess.run([binary, *opts, *batch], capture_output=True, text=True, timeout=t, env=env)
        except subprocess.TimeoutExpired:
            return None, "", "timeout"
        return p.returncode, p.stdout, p.stderr

    rc, out, err = once(files, timeout)
    for line in out.splitlines():
        m = LINE.match(line)
        if m:
            results[m["path"]] = (m["verdict"], m["rest"])
    missing = [f for f in files if f not in results]
    if rc not in (0, 1) or missing:
        for f in missing:
            rc1, out1, err1 = once([f], 120)
            m = next((LINE.match(l) for l in out1.splitlines() if LINE.match(l)), None)
            if m:
                results[f] = (m["verdict"], m["rest"])
            elif rc1 is None:
                results[f] = ("HANG", "no answer within 120 s")
            else:
                tail = " | ".join((err1 or out1).strip().splitlines()[-4:])
                results[f] = ("CRASH", f"exit {rc1}: {tail}")
    return results


def field(text, key):
    m = re.search(rf"{key}=([0-9.eE+-]+|inf|NaN)", text)
    return float(m[1]) if m else None


def summarise(out_dir, files, results, title):
    by_block = {}
    fails = []
    worst = {}
    for f in files:
        cfg, meta = read_case(f)
        key = cfg["block"] + ("/" + cfg["impl"] if "impl" in cfg else "")
        verdict, text = results.get(f, ("MISSING", ""))
        n = by_block.setdefault(key, [0, 0])
        n[0] += 1
        if verdict == "PASS":
            n[1] += 1
            e, tol = field(text, "output_err"), field(text, "tol")
            if e is not None and tol:
                r = e / tol
                if field(text, "attention_err") is not None:
                    r = max(r, field(text, "attention_err") / 5e-4)
                if field(text, "grad_param_err") is not None:
                    r = max(r, field(text, "grad_param_err") / 1e-4, field(text, "grad_input_err") / grad_tol(f))
                if r > worst.get(key, (0, ""))[0]:
                    te = meta.get("torch_f32_max_abs_err")
                    te = float(te) / tol if te else float(meta.get("torch_f32_err_over_tol", "nan"))
                    worst[key] = (r, os.path.basename(f) + f", torch f32 at {te:.3f}")
        else:
            fails.append((f, verdict, text, cfg, meta))
    print(f"\n== {title}: {sum(v[1] for v in by_block.values())}/{len(files)} pass")
    for k in sorted(by_block):
        total, ok = by_block[k]
        w = worst.get(k)
        margin = f"  worst err/tol {w[0]:.3f} ({w[1]})" if w else ""
        print(f"  {k:<12} {ok:4d}/{total:<4d} pass{margin}")
    for f, verdict, text, cfg, meta in fails:
        torch_err = meta.get("torch_f32_max_abs_err", "-")
        note = ""
        tol = field(text, "tol")
        if tol and torch_err != "-" and float(torch_err) > 0.5 * tol:
            note = f"  (ill-conditioned: PyTorch's own f32 run is at {float(torch_err) / tol:.2f} of the tolerance)"
        if "torch_f32_err_over_tol" in meta:
            note = f"  (PyTorch's own f32 run at {meta['torch_f32_err_over_tol']} of the tolerance)"
        print(f"  {verdict}: {f}\n      {text}\n      config: {describe(cfg)}  torch_f32_err={torch_err}{note}")
        if "loss" in meta and verdict == "FAIL":
            try:
                rows = sorted(torch_f32_detail(f), key=lambda r: r[1] / r[2])[-2:]
                key_bias = re.search(r"(^|\.)(phi(\.0)?(\.conv)?|p|key_conv)\.bias$", rows[-1][0])
                print("      PyTorch f32's worst tensors: " + ", ".join(f"{k} {e / t:.3f}" for k, e, t in rows)
                      + (" (a key bias in a softmax mode: its gradient is 0 in exact arithmetic, so its error is "
                         "pure rounding noise against an absolute 1e-4)" if key_bias and cfg.get("mode") != "dot_product"
                         else ""))
            except Exception as e:  # triage only
                print(f"      (PyTorch f32 detail failed: {e})")
    return len(fails)


def grad_tol(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return 1e-4 * max(1.0, f.get_tensor("grad_input").abs().max().item())


def torch_f32_detail(path):
    """PyTorch's own float32 run of a case file (module rebuilt from `sweep_case`, parameters
    from the file): err/tol per tensor, as the checker measures the crate."""
    from safetensors import safe_open

    cfg, meta = read_case(path)
    with safe_open(path, "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    module, _, _ = build(cfg)
    prefix = cfg.get("prefix", "")
    state = {k: (t[prefix + k].float() if t[prefix + k].is_floating_point() else t[prefix + k])
             for k in module.state_dict()}
    module.load_state_dict(state)
    module = module.float().eval()
    dims = dims_of(cfg)
    x = to_module(t["input"], dims).requires_grad_("grad_output" in t)
    out = run_module(module, cfg, x)
    rows = []

    def cmp(key, got, want):
        tol = 1e-4 * max(1.0, want.abs().max().item())
        rows.append((key, (got.detach().float() - want).abs().max().item(), tol))

    cmp("output", from_module(out, dims), t["output"])
    if "grad_output" in t:
        params = dict(module.named_parameters())
        gs = torch.autograd.grad((out * to_module(t["grad_output"], dims)).sum(), [x] + list(params.values()))
        cmp("grad_input", from_module(gs[0], dims), t["grad_input"])
        for (k, _), g in zip(params.items(), gs[1:]):
            cmp(prefix + k, g, t[f"grad.{prefix}{k}"])
    return rows


def print_torch_f32_detail(path):
    print(path)
    for key, err, tol in torch_f32_detail(path):
        print(f"  {key:<40} err={err:.3e} tol={tol:.3e} ratio={err / tol:.3f}")


def read_case(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("sweep_case", "{}")), meta


# ---------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=60)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="")
    p.add_argument("--blocks", default=",".join(ALL_BLOCKS))
    p.add_argument("--grad", action="store_true", help="gradient cases")
    p.add_argument("--only", default="", help="comma-separated case indices to (re)generate")
    p.add_argument("--case", default="", help="write one case from this JSON configuration")
    p.add_argument("--check-only", action="store_true", help="run the checkers on the files in --out")
    p.add_argument("--no-check", action="store_true", help="only write the files")
    p.add_argument("--pth", action="store_true", help="also save each case's parameters as a .pth (zip or legacy, "
                   "maybe under 'state_dict'/'model') and check the case with `golden --weights` on it")
    p.add_argument("--bf16", action="store_true", help="also run `golden --precision bf16` on the non-local cases, "
                   "against PyTorch's bf16-autocast error on each (metadata torch_bf16_err, via --torch-err)")
    p.add_argument("--candle", action="store_true", help="also run candle_golden on the non-local cases")
    p.add_argument("--threads", default="", help="also run golden with these RAYON_NUM_THREADS (e.g. 1,3) "
                   "and compare the output bits with the default run (the crate claims bit-identical results)")
    p.add_argument("--timeout", type=int, default=900, help="seconds for one checker run over all files")
    p.add_argument("--torch-f32", nargs="*", metavar="FILE", help="only print PyTorch's own float32 error per "
                   "tensor on these case files (triage: is a failure the crate's or the case's conditioning?)")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.torch_f32:
        for f in args.torch_f32:
            print_torch_f32_detail(f)
        return
    if not args.out:
        sys.exit("--out DIR is required")
    out_dir = os.path.abspath(args.out)
    if out_dir == ROOT or out_dir.startswith(ROOT + os.sep):
        sys.exit("--out must be outside the repository")
    os.makedirs(out_dir, exist_ok=True)
    blocks = [b for b in args.blocks.split(",") if b]
    bad = [b for b in blocks if b not in ALL_BLOCKS]
    if bad:
        sys.exit(f"unknown blocks {bad}; choose from {ALL_BLOCKS}")

    kind = "grad" if args.grad else "fwd"
    if args.case:
        cfg = json.loads(args.case)
        grad = args.grad
        path, _ = write_case(out_dir, f"case_{zlib.crc32(args.case.encode()):08x}_{kind}", cfg, args.case, grad)
        files = [path]
        print(f"wrote {path}: {describe(cfg)}")
    elif not args.check_only:
        only = {int(i) for i in args.only.split(",") if i}
        files = []
        t0 = time.time()
        for i in range(args.count):
            if only and i not in only:
                continue
            block = blocks[i % len(blocks)]
            seed_text = f"{args.seed}:{i}:{kind}:{block}"
            r = random.Random(seed_text)
            cfg = draw(block, r, args.grad)
            name = f"{kind}_s{args.seed}_{i:04d}_{block}"
            try:
                path, _ = write_case(out_dir, name, cfg, seed_text, args.grad, args.pth)
            except Exception as e:  # an upstream module refusing a configuration is a generator limit
                print(f"  case {i}: upstream refused {describe(cfg)}: {type(e).__name__}: {e}")
                continue
            files.append(path)
        print(f"wrote {len(files)} {kind} cases to {out_dir} in {time.time() - t0:.0f} s")
    else:
        files = sorted(glob.glob(os.path.join(out_dir, "*.safetensors")))
    if args.no_check or not files:
        return
    golden = os.path.join(ROOT, "target", "release", "examples", "golden")
    base = run_checker(golden, files, args.timeout)
    nfail = summarise(out_dir, files, base, "golden (native)")
    pths = [f for f in files if os.path.exists(f[: -len(".safetensors")] + ".pth")]
    if pths:
        res = {}
        for f in pths:
            res.update(run_checker(golden, [f], 120, weights=f[: -len(".safetensors")] + ".pth"))
        nfail += summarise(out_dir, pths, res, "golden --weights CASE.pth")
    for t in [int(t) for t in args.threads.split(",") if t]:
        other = run_checker(golden, files, args.timeout, threads=t)
        differ = [f for f in files if re.search(r"bits=\w+", base.get(f, ("", ""))[1] or "")
                  and (re.search(r"bits=\w+", base[f][1])[0] != (re.search(r"bits=\w+", other.get(f, ("", ""))[1]) or [""])[0])]
        print(f"\n== RAYON_NUM_THREADS={t}: {len(files) - len(differ)}/{len(files)} with the default run's output bits")
        for f in differ:
            print(f"  bits differ: {f}\n      default: {base[f][1]}\n      {t} threads: {other.get(f)}")
        nfail += len(differ)
    if args.bf16:
        nl = [f for f in files if "torch_bf16_err" in read_case(f)[1]]
        table = os.path.join(out_dir, "torch_bf16_err.txt")
        with open(table, "w") as t:
            for f in nl:
                t.write(f"{os.path.basename(f)} {read_case(f)[1]['torch_bf16_err']}\n")
        res = {}
        for i in range(0, len(nl), 200):
            batch = nl[i:i + 200]
            res.update(run_checker(golden, batch, args.timeout, extra=["--precision", "bf16", "--torch-err", table]))
        nfail += summarise(out_dir, nl, res, "golden --precision bf16 (bound max(1.25 x torch bf16 err, 4e-3))")
    if args.candle:
        cand = [f for f in files if read_case(f)[0].get("block") in NON_LOCAL_BLOCKS]
        binary = os.path.join(ROOT, "target", "release", "examples", "candle_golden")
        if cand:
            nfail += summarise(out_dir, cand, run_checker(binary, cand, args.timeout), "candle_golden")
    sys.exit(1 if nfail else 0)


if __name__ == "__main__":
    main()
