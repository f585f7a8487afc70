#!/usr/bin/env python3
"""Writes the family golden cases of tests/data/family/ with the upstream modules themselves.

Not part of CI: the files are committed. Needs the venv of the team (/work/venv: torch, timm,
mmengine, mmcv-lite 2.2.0) and the mmsegmentation 1.2.2 wheel (see scripts/family_upstream.py).

    /work/venv/bin/python scripts/make_family.py            # writes the cases, then verifies all
    /work/venv/bin/python scripts/make_family.py --verify   # only re-checks the files there

Each case builds one upstream module (mmcv ContextBlock, timm GlobalContext, mmcv
CrissCrossAttention, mmseg DisentangledNonLocal2d, timm NonLocalAttn) in float64, randomises every
parameter and buffer (conv biases, LayerNorm affine, BatchNorm affine and running statistics,
the criss-cross gamma all non-trivial), rounds them to the storage dtype (F32, or F16 for the
`_f16` case), and runs the module in float64 on a float32-representable input. Input and output
are stored as float32, channels last (B, T=1, H, W, C); parameters under the module's exact
`state_dict` keys (after `prefix`, among unrelated tensors for `_prefix` cases).

`grad_*` cases add `grad_output` and the float64 autograd gradients of sum(output * grad_output)
(`grad_input`, `grad.<key>` for every parameter; BatchNorm in eval form). `corrupt_<block>` files
are a case of that block whose output was perturbed by 20 tolerances at one position.

The verification reads every file of the folder back, rebuilds the module from the metadata and
the stored tensors alone, runs it in float32 and prints max |got - want| against the tolerance
1e-4 * max(1, max |want|), per tensor; corrupt files must fail.
"""

import argparse
import copy
import json
import os
import struct
import sys
import zlib

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import family_upstream  # noqa: E402

OUT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "family"))
SHARED = "/work/shared/golden/family"
SHARED_FILES = [
    "cc_mmcv.safetensors",
    "dnl_mmseg.safetensors",
    "gc_mmcv_add.safetensors",
    "gc_mmcv_mul_avg.safetensors",
    "gc_timm_scale.safetensors",
    "nl_timm.safetensors",
]
LOSS = "sum(output * grad_output)"


def versions():
    import mmcv
    import timm

    return f"torch {torch.__version__.split('+')[0]}, mmcv-lite {mmcv.__version__}, timm {timm.__version__}, mmsegmentation {family_upstream.MMSEG_VERSION}"


def b(v):
    return "true" if v else "false"


# ---------------------------------------------------------------------------------------------
# Building a module (from a case spec, or from a file's metadata).


def build(block, cfg):
    """The upstream module for `block` configured by `cfg` (metadata-like strings or values)."""
    if block == "context_block":
        from mmcv.cnn import ContextBlock

        fusion = tuple(cfg["fusion_types"].split(","))
        return ContextBlock(int(cfg["in_channels"]), float(cfg["ratio"]), cfg["pooling_type"], fusion)
    if block == "global_context":
        from timm.layers import GlobalContext

        return GlobalContext(
            int(cfg["in_channels"]),
            use_attn=cfg["use_attn"] == "true",
            fuse_add=cfg["fuse_add"] == "true",
            fuse_scale=cfg["fuse_scale"] == "true",
            rd_channels=int(cfg["rd_channels"]),
            gate_layer=cfg.get("gate", "sigmoid"),
        )
    if block == "criss_cross":
        return family_upstream.criss_cross_attention()(int(cfg["in_channels"]))
    if block == "disentangled":
        dnl = family_upstream.disentangled_non_local()
        c, ci = int(cfg["in_channels"]), int(cfg["inter_channels"])
        reduction = next(r for r in range(1, c + 1) if max(c // r, 1) == ci)
        norm = dict(type="BN", eps=float(cfg["bn_eps"])) if cfg["bn_layer"] == "true" else None
        return dnl(
            c,
            reduction=reduction,
            use_scale=cfg["use_scale"] == "true",
            norm_cfg=norm,
            mode=cfg["mode"],
            temperature=float(cfg["temperature"]),
        )
    if block == "non_local":
        from timm.layers import NonLocalAttn

        return NonLocalAttn(int(cfg["in_channels"]), use_scale=cfg["use_scale"] == "true",
                            rd_channels=int(cfg["inter_channels"]))
    raise ValueError(block)


def run(module, block, meta, x):
    """The block's output for NCHW `x`; criss-cross applied `recurrence` times, as CCNet's head."""
    reps = int(meta.get("recurrence", "1")) if block == "criss_cross" else 1
    for _ in range(reps):
        x = module(x)
    return x


# ---------------------------------------------------------------------------------------------
# Case specs: (block, name, B, H, W, options). The options give the module configuration and
# the metadata; `meta()` fills in the derived fields from the built module.


def context_block(name, c, ratio, pooling, fusion, bsz, h, w, **kw):
    return dict(block="context_block", name=name, B=bsz, H=h, W=w,
                cfg=dict(in_channels=str(c), ratio=repr(ratio), pooling_type=pooling, fusion_types=",".join(fusion)), **kw)


def global_context(name, c, use_attn, fuse_add, fuse_scale, bsz, h, w, rd_ratio=1.0 / 8, **kw):
    from timm.layers.helpers import make_divisible

    rd = make_divisible(c * rd_ratio, 1, round_limit=0.0)  # GlobalContext's own rule (rd_divisor 1)
    return dict(block="global_context", name=name, B=bsz, H=h, W=w, rd_ratio=rd_ratio,
                cfg=dict(in_channels=str(c), use_attn=b(use_attn), fuse_add=b(fuse_add), fuse_scale=b(fuse_scale),
                         rd_channels=str(rd), gate="sigmoid"), **kw)


def criss_cross(name, c, recurrence, bsz, h, w, **kw):
    return dict(block="criss_cross", name=name, B=bsz, H=h, W=w,
                cfg=dict(in_channels=str(c), recurrence=str(recurrence)), **kw)


def disentangled(name, c, reduction, mode, use_scale, temperature, bn, bsz, h, w, bn_eps=1e-5, **kw):
    return dict(block="disentangled", name=name, B=bsz, H=h, W=w,
                cfg=dict(in_channels=str(c), inter_channels=str(max(c // reduction, 1)), mode=mode, use_scale=b(use_scale),
                         temperature=repr(temperature), bn_layer=b(bn), bn_eps=repr(bn_eps)), **kw)


def non_local(name, c, use_scale, bsz, h, w, rd_ratio=1.0 / 8, rd_divisor=8, **kw):
    from timm.layers.helpers import make_divisible

    rd = make_divisible(c * rd_ratio, divisor=rd_divisor)  # NonLocalAttn's own rule
    return dict(block="non_local", name=name, B=bsz, H=h, W=w, rd_ratio=rd_ratio, rd_divisor=rd_divisor,
                cfg=dict(in_channels=str(c), inter_channels=str(rd), use_scale=b(use_scale)), **kw)


CASES = [
    # context_block: mmcv ContextBlock(in_channels, ratio, pooling_type, fusion_types)
    context_block("context_block_att_add", 16, 1 / 3, "att", ["channel_add"], 2, 5, 7),
    context_block("context_block_att_mul", 16, 3 / 8, "att", ["channel_mul"], 1, 1, 9),
    context_block("context_block_att_add_mul", 24, 0.3, "att", ["channel_add", "channel_mul"], 2, 9, 1),
    context_block("context_block_avg_add", 16, 0.25, "avg", ["channel_add"], 2, 5, 7),
    context_block("context_block_avg_mul", 20, 0.2, "avg", ["channel_mul"], 2, 1, 9),
    context_block("context_block_avg_mul_add", 12, 0.5, "avg", ["channel_mul", "channel_add"], 1, 7, 5),
    context_block("context_block_ratio_truncation", 100, 0.29, "att", ["channel_add", "channel_mul"], 1, 3, 5),
    context_block("context_block_1x1", 16, 1 / 3, "att", ["channel_add", "channel_mul"], 2, 1, 1),
    context_block("context_block_prefix", 16, 0.25, "att", ["channel_add"], 1, 5, 7, prefix="backbone.layer3.0.context_block3."),
    context_block("context_block_f16", 16, 1 / 3, "att", ["channel_add", "channel_mul"], 2, 5, 7, param_dtype="f16"),
    # global_context: timm GlobalContext(channels, use_attn, fuse_add, fuse_scale, rd_ratio)
    global_context("global_context_attn_add_scale", 20, True, True, True, 2, 5, 7),
    global_context("global_context_attn_add", 20, True, True, False, 2, 1, 9),
    global_context("global_context_attn_scale", 24, True, False, True, 2, 9, 1),
    global_context("global_context_mean_add_scale", 20, False, True, True, 2, 5, 7),
    global_context("global_context_mean_add", 28, False, True, False, 1, 7, 5),
    global_context("global_context_mean_scale", 16, False, False, True, 2, 5, 3, rd_ratio=0.3),
    # criss_cross: mmcv CrissCrossAttention(in_channels), applied `recurrence` times
    criss_cross("criss_cross_r1_c16", 16, 1, 2, 5, 7),
    criss_cross("criss_cross_r2_c16", 16, 2, 2, 7, 5),
    criss_cross("criss_cross_r1_c24", 24, 1, 1, 9, 5),
    criss_cross("criss_cross_r2_c24", 24, 2, 2, 5, 9),
    criss_cross("criss_cross_h1", 16, 2, 2, 1, 9),
    criss_cross("criss_cross_w1", 16, 1, 2, 9, 1),
    criss_cross("criss_cross_1x1", 16, 2, 2, 1, 1),
    criss_cross("criss_cross_prefix", 16, 2, 1, 5, 6, prefix="decode_head.cca."),
    # disentangled: mmseg DisentangledNonLocal2d(in_channels, reduction, use_scale, norm_cfg, mode, temperature)
    disentangled("disentangled_eg_scale_t005_bn", 16, 2, "embedded_gaussian", True, 0.05, True, 2, 5, 7),
    disentangled("disentangled_eg_noscale_t005_bn", 16, 2, "embedded_gaussian", False, 0.05, True, 1, 7, 5, qk_gain=0.5),
    disentangled("disentangled_eg_scale_t05_nobn", 16, 2, "embedded_gaussian", True, 0.5, False, 2, 1, 9),
    disentangled("disentangled_eg_noscale_t05_nobn", 16, 2, "embedded_gaussian", False, 0.5, False, 2, 9, 1),
    disentangled("disentangled_eg_scale_t05_bn_eps", 12, 3, "embedded_gaussian", True, 0.5, True, 2, 5, 5, bn_eps=1e-3),
    disentangled("disentangled_dp_bn", 16, 2, "dot_product", True, 0.05, True, 2, 5, 7),
    disentangled("disentangled_dp_nobn", 16, 2, "dot_product", False, 0.05, False, 1, 7, 3),
    disentangled("disentangled_prefix", 16, 2, "embedded_gaussian", True, 0.05, True, 1, 5, 6, prefix="decode_head.dnl_block."),
    # non_local: timm NonLocalAttn(in_channels, use_scale, rd_ratio, rd_divisor)
    non_local("non_local_scale", 32, True, 2, 5, 7),
    non_local("non_local_noscale", 32, False, 2, 7, 5),
    non_local("non_local_r4_div1", 24, True, 1, 1, 9, rd_ratio=1 / 4, rd_divisor=1),
    non_local("non_local_r2_noscale", 16, False, 2, 9, 1, rd_ratio=1 / 2),
    non_local("non_local_r8_div1_odd", 40, True, 1, 5, 5, rd_ratio=1 / 8, rd_divisor=1),
]

GRAD_CASES = [
    context_block("grad_context_block_att_add_mul", 16, 1 / 3, "att", ["channel_add", "channel_mul"], 2, 5, 7),
    context_block("grad_context_block_avg_mul_add", 12, 0.5, "avg", ["channel_mul", "channel_add"], 1, 3, 5),
    global_context("grad_global_context_attn_add_scale", 20, True, True, True, 2, 5, 7),
    global_context("grad_global_context_mean_add", 20, False, True, False, 1, 3, 5),
    criss_cross("grad_criss_cross_r1", 16, 1, 2, 5, 7),
    criss_cross("grad_criss_cross_r2", 24, 2, 1, 7, 5),
    disentangled("grad_disentangled_eg_bn", 16, 2, "embedded_gaussian", True, 0.05, True, 2, 5, 7),
    disentangled("grad_disentangled_dp_nobn", 16, 2, "dot_product", False, 0.05, False, 1, 3, 5),
    disentangled("grad_disentangled_eg_nobn", 12, 3, "embedded_gaussian", False, 0.5, False, 1, 5, 3),
    non_local("grad_non_local_scale", 32, True, 2, 5, 7),
    non_local("grad_non_local_noscale_div1", 24, False, 1, 3, 5, rd_ratio=1 / 4, rd_divisor=1),
]

# corrupt_<block>: the case it is made from
CORRUPT_FROM = {
    "context_block": "context_block_att_add",
    "global_context": "global_context_attn_add_scale",
    "criss_cross": "criss_cross_r2_c16",
    "disentangled": "disentangled_eg_scale_t005_bn",
    "non_local": "non_local_scale",
}


def metadata(case, module):
    """The metadata of a case, in the conventions of the shared family files."""
    block, cfg = case["block"], case["cfg"]
    m = dict(block=block, dims="2", layout="B,T,H,W,C", prefix=case.get("prefix", ""), in_channels=cfg["in_channels"])
    if block == "context_block":
        m.update(naming="mmcv", ratio=cfg["ratio"], planes=str(module.planes), pooling_type=cfg["pooling_type"],
                 fusion_types=cfg["fusion_types"], ln_eps="1e-05")
    elif block == "global_context":
        from timm.layers import GlobalContext

        by_ratio = GlobalContext(int(cfg["in_channels"]), fuse_add=True, rd_ratio=case["rd_ratio"])
        assert by_ratio.mlp_add.fc1.out_channels == int(cfg["rd_channels"])
        m.update(naming="timm", use_attn=cfg["use_attn"], fuse_add=cfg["fuse_add"], fuse_scale=cfg["fuse_scale"],
                 rd_channels=cfg["rd_channels"], gate="sigmoid", ln_eps="1e-06")
    elif block == "criss_cross":
        m.update(naming="mmcv", qk_channels=str(module.query_conv.out_channels), recurrence=cfg["recurrence"])
    elif block == "disentangled":
        assert module.inter_channels == int(cfg["inter_channels"])
        m.update(naming="mmseg", mode=cfg["mode"], inter_channels=cfg["inter_channels"], sub_sample="none",
                 use_scale=cfg["use_scale"], temperature=cfg["temperature"], bn_layer=cfg["bn_layer"],
                 bn_eps=cfg["bn_eps"])
    elif block == "non_local":
        from timm.layers import NonLocalAttn

        by_ratio = NonLocalAttn(int(cfg["in_channels"]), rd_ratio=case["rd_ratio"], rd_divisor=case["rd_divisor"])
        assert by_ratio.t.out_channels == int(cfg["inter_channels"])
        m.update(naming="timm", mode="embedded_gaussian", inter_channels=cfg["inter_channels"], sub_sample="none",
                 use_scale=cfg["use_scale"], logit_scale=repr(float(module.scale)), bn_layer="true", bn_eps="1e-05")
    return m


# ---------------------------------------------------------------------------------------------
# Randomising parameters so that every part of the block shows in the output.


def randomise_norm(m, randn, unif):
    """A LayerNorm's affine, a BatchNorm's affine and running statistics (any rank), or a
    `Scale`'s value (criss-cross's gamma) made non-trivial; other modules are left alone.
    `randn(*shape)` and `unif(lo, hi, *shape)` draw float64 tensors from the case's generator."""
    nn = torch.nn
    if isinstance(m, nn.LayerNorm):
        m.weight.copy_(1.0 + 0.3 * randn(*m.weight.shape))
        m.bias.copy_(0.3 * randn(*m.bias.shape))
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        m.weight.copy_(unif(0.5, 1.5, *m.weight.shape))
        m.bias.copy_(0.3 * randn(*m.bias.shape))
        m.running_mean.copy_(0.3 * randn(*m.running_mean.shape))
        m.running_var.copy_(unif(0.5, 2.0, *m.running_var.shape))
        m.num_batches_tracked.fill_(17)
    elif type(m).__name__ == "Scale":
        m.scale.copy_(torch.tensor(0.8, dtype=torch.float64) * torch.sign(randn(1)[0]) + 0.2 * randn(1)[0])


def randomise(module, gen, case):
    nn = torch.nn
    qk_gain = case.get("qk_gain", 1.0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def unif(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)

    with torch.no_grad():
        for name, m in module.named_modules():
            leaf = name.split(".")[-1] if name else ""
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight.shape[1]
                gain = 1.0
                # the attention projections: logits of a moderate size, so the softmax is neither flat nor one-hot
                if leaf in ("query_conv", "key_conv", "t", "p") or name.startswith(("theta", "phi")):
                    gain = qk_gain
                if leaf in ("conv_mask", "conv_attn"):
                    gain = 1.5
                m.weight.copy_(randn(*m.weight.shape) * gain / fan_in**0.5)
                if m.bias is not None:
                    m.bias.copy_(0.3 * randn(*m.bias.shape))
            else:
                randomise_norm(m, randn, unif)


def round_params(module, dtype):
    """Rounds every floating parameter and buffer to `dtype` (the stored values) and back."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(dtype).to(torch.float64))


def to_blhwc(x):
    return x.permute(0, 2, 3, 1).unsqueeze(1).contiguous()


def from_blhwc(x):
    return x[:, 0].permute(0, 3, 1, 2).contiguous()


def surrounding_model(prefix, gen, block_tensors):
    """Unrelated tensors of a whole-model checkpoint around the block under `prefix`: other layers,
    and a sibling block with the same key suffixes (other shapes) under another prefix."""
    def r(*shape):
        return torch.randn(tuple(shape), generator=gen)

    top = prefix.split(".")[0]
    t = {
        f"{top}.stem.0.weight": r(4, 3, 3, 3),
        f"{top}.stem.1.running_mean": r(4),
        "meta.step": torch.tensor(12345, dtype=torch.int64),
        "head.fc.weight": r(5, 7),
    }
    parts = prefix.split(".")
    digits = [i for i, part in enumerate(parts) if part.isdigit()]
    if digits:  # the same block in the next layer
        parts[digits[-1]] = str(int(parts[digits[-1]]) + 1)
        sibling = ".".join(parts)
    else:  # the same block in the auxiliary head
        sibling = "auxiliary_head." + ".".join(parts[1:])
    for k, v in block_tensors.items():
        if v.is_floating_point():
            shape = list(v.shape)
            if shape:
                shape[0] += 1
            t[sibling + k] = r(*shape)
    return t


def make_case(case, with_grad=False):
    block = case["block"]
    gen = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()))
    module = build(block, case["cfg"]).double().eval()
    randomise(module, gen, case)
    store = torch.float16 if case.get("param_dtype") == "f16" else torch.float32
    round_params(module, store)
    meta = metadata(case, module)
    c = int(case["cfg"]["in_channels"])
    x = torch.randn(case["B"], c, case["H"], case["W"], generator=gen) * 1.2 + 0.3 * torch.randn(1, c, 1, 1, generator=gen)
    x64 = x.double()

    tensors = {}
    state = module.state_dict()
    for k, v in state.items():
        if v.is_floating_point():
            tensors[k] = v.to(store).contiguous()
        else:
            tensors[k] = v.to(torch.int64).contiguous()
    if with_grad:
        xg = x64.clone().requires_grad_(True)
        out = run(module, block, meta, xg)
        gout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        params = dict(module.named_parameters())
        grads = torch.autograd.grad((out * gout).sum(), [xg] + list(params.values()))
        out = out.detach()
        tensors["grad_output"] = to_blhwc(gout).float()
        tensors["grad_input"] = to_blhwc(grads[0]).float()
        for (k, _), g in zip(params.items(), grads[1:]):
            tensors[f"grad.{k}"] = g.float().contiguous()
        meta["loss"] = LOSS
        meta["batchnorm"] = "inference (frozen statistics)"
    else:
        with torch.no_grad():
            out = run(module, block, meta, x64)
        m32 = copy.deepcopy(module).float()
        with torch.no_grad():
            out32 = run(m32, block, meta, x.clone())
        meta["torch_f32_max_abs_err"] = f"{(out32.double() - out).abs().max().item():.3g}"
        meta["output_max_abs"] = f"{out.abs().max().item():.3g}"
    meta["made_by"] = f"scripts/make_family.py ({versions()})"
    prefix = case.get("prefix", "")
    if prefix:
        params = {prefix + k: v for k, v in tensors.items() if not k.startswith("grad")}
        rest = {k: v for k, v in tensors.items() if k.startswith("grad")}
        tensors = {**surrounding_model(prefix, gen, {k: v for k, v in state.items()}), **params, **rest}
    tensors["input"] = to_blhwc(x)
    tensors["output"] = to_blhwc(out).float()
    return tensors, meta


def write(name, tensors, meta):
    path = os.path.join(OUT, name + ".safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=meta)
    sort_header(path)
    return path


def sort_header(path):
    """Rewrites the header JSON with sorted keys (same length), so a regeneration is byte-identical
    (safetensors writes the metadata in hash order)."""
    data = bytearray(open(path, "rb").read())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(dict(sorted(header.items())), separators=(",", ":"), ensure_ascii=False).encode()
    assert len(text) <= n, (len(text), n)
    data[8 : 8 + n] = text + b" " * (n - len(text))
    open(path, "wb").write(bytes(data))


def generate():
    os.makedirs(OUT, exist_ok=True)
    import shutil

    for f in SHARED_FILES:
        shutil.copyfile(os.path.join(SHARED, f), os.path.join(OUT, f))
    made = {}
    for case in CASES:
        tensors, meta = make_case(case)
        write(case["name"], tensors, meta)
        made[case["name"]] = (tensors, meta)
    for case in GRAD_CASES:
        tensors, meta = make_case(case, with_grad=True)
        write(case["name"], tensors, meta)
    for block, src in CORRUPT_FROM.items():
        tensors, meta = made[src]
        tensors = dict(tensors)
        out = tensors["output"].clone()
        tol = 1e-4 * max(1.0, out.abs().max().item())
        flat = out.view(-1)
        i = flat.numel() // 3
        flat[i] += 20 * tol
        tensors["output"] = out
        write(f"corrupt_{block}", tensors, meta)


# ---------------------------------------------------------------------------------------------
# Verification: rebuild from the file alone, float32, compare.


def load(path):
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def verify_file(path):
    """(rows, ok): one row (tensor, max err, tolerance) per compared tensor."""
    tensors, meta = load(path)
    block = meta["block"]
    prefix = meta.get("prefix", "")
    module = build(block, meta)
    state = {}
    for k in module.state_dict():
        v = tensors[prefix + k]
        state[k] = v.float() if v.is_floating_point() else v
    module.load_state_dict(state, strict=True)
    module = module.float().eval()
    x = from_blhwc(tensors["input"])
    rows = []

    def cmp(key, got, want):
        tol = 1e-4 * max(1.0, want.abs().max().item())
        err = (got.detach().float() - want).abs().max().item()
        rows.append((key, err, tol))

    if "grad_output" in tensors:
        xg = x.clone().requires_grad_(True)
        out = run(module, block, meta, xg)
        params = dict(module.named_parameters())
        grads = torch.autograd.grad((out * from_blhwc(tensors["grad_output"])).sum(), [xg] + list(params.values()))
        cmp("output", to_blhwc(out), tensors["output"])
        cmp("grad_input", to_blhwc(grads[0]), tensors["grad_input"])
        for (k, _), g in zip(params.items(), grads[1:]):
            cmp(f"grad.{k}", g, tensors[f"grad.{k}"])
        missing = [k for k in params if f"grad.{k}" not in tensors]
        assert not missing, missing
    else:
        with torch.no_grad():
            out = run(module, block, meta, x)
        cmp("output", to_blhwc(out), tensors["output"])
    return rows, all(err <= tol for _, err, tol in rows)


def verify():
    names = sorted(f for f in os.listdir(OUT) if f.endswith(".safetensors"))
    bad = 0
    print(f"{'file':<44} {'KB':>5} {'tensors':>7} {'worst tensor':<28} {'max_err':>9} {'tol':>9} {'err/tol':>8}  result")
    for f in names:
        path = os.path.join(OUT, f)
        rows, ok = verify_file(path)
        key, err, tol = max(rows, key=lambda r: r[1] / r[2])
        expect_fail = f.startswith("corrupt_")
        good = ok != expect_fail
        bad += not good
        verdict = ("rejected (as it must)" if not ok else "ACCEPTED (BAD)") if expect_fail else ("pass" if ok else "FAIL")
        print(f"{f:<44} {os.path.getsize(path) / 1024:5.1f} {len(rows):7d} {key:<28} {err:9.2e} {tol:9.2e} {err / tol:8.3f}  {verdict}")
    print(f"{len(names)} files, {bad} wrong")
    return bad == 0


# ---------------------------------------------------------------------------------------------
# The generated part of tests/data/family/README.md: every file's configuration and keys.

BEGIN, END = "<!-- generated by scripts/make_family.py: begin -->", "<!-- generated by scripts/make_family.py: end -->"
INFO_KEYS = ("block", "naming", "dims", "layout", "made_by", "torch_f32_max_abs_err", "output_max_abs", "loss", "batchnorm")


def tables():
    names = sorted(f for f in os.listdir(OUT) if f.endswith(".safetensors"))
    lines = [BEGIN, ""]
    blocks = {}
    for f in names:
        tensors, meta = load(os.path.join(OUT, f))
        blocks.setdefault(meta["block"], []).append((f, tensors, meta))
    for block, files in blocks.items():
        lines += [f"### `{block}`", "", "| file | origin | input (B,T,H,W,C) | configuration metadata | parameter keys: shape (dtype if not F32) |",
                  "|---|---|---|---|---|"]
        for f, tensors, meta in files:
            prefix = meta.get("prefix", "")
            module = build(block, meta)
            keys = list(module.state_dict())

            def desc(k):
                v = tensors[prefix + k]
                dt = {torch.float32: "", torch.float16: " F16", torch.int64: " I64"}.get(v.dtype, f" {v.dtype}")
                return f"`{k}` {list(v.shape)}{dt}"

            config = ", ".join(f"{k}={v}" for k, v in sorted(meta.items()) if k not in INFO_KEYS and v != "")
            if prefix:
                config = config.replace(f"prefix={prefix}", f"prefix=`{prefix}`")
            extra = sorted(set(tensors) - {prefix + k for k in keys} - {"input", "output"})
            grads = [k for k in extra if k.startswith("grad")]
            other = [k for k in extra if not k.startswith("grad")]
            notes = ""
            if grads:
                notes += f"; plus `grad_output`, `grad_input` and {len(grads) - 2} `grad.<key>` (every parameter)"
            if other:
                notes += f"; plus {len(other)} unrelated tensors (e.g. `{other[0]}`)"
            origin = "shared" if f in SHARED_FILES else ("corrupt control" if f.startswith("corrupt_") else "make_family")
            shape = list(tensors["input"].shape)
            lines.append(f"| `{f}` | {origin} | {shape} | {config} | {'; '.join(desc(k) for k in keys)}{notes} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def update_readme():
    path = os.path.join(OUT, "README.md")
    text = open(path).read()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    open(path, "w").write(text[:start] + tables() + text[end:])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--verify", action="store_true", help="only verify the files in tests/data/family/")
    p.add_argument("--readme", action="store_true", help="only rewrite the generated tables of the README")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.readme:
        update_readme()
        return
    if not args.verify:
        generate()
        if os.path.exists(os.path.join(OUT, "README.md")):
            update_readme()
    sys.exit(0 if verify() else 1)


if __name__ == "__main__":
    main()
