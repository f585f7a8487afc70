"""Fixtures proving that `to_safetensors_with_keys(&WeightKeys::mmcv())` writes what mmcv takes.

For each AlexHex7 golden case with BatchNorm given on the command line, the crate's export of its
block under mmcv's keys (made beforehand with
`cargo run --release --example convert -- --to mmcv CASE EXPORT`) is loaded into mmcv's own
`NonLocal3d(in_channels, norm_cfg=dict(type='BN3d'), sub_sample=True, mode=..., use_scale=False)`
with PyTorch's *strict* `load_state_dict` (no missing, no unexpected key), run in float64 on the
case's input, and stored in the golden format: the exported tensors, `input`, and mmcv's
`output` (float32). tests/errors.rs checks that the crate exports exactly these tensors and
tests/golden.rs runs the files like every golden case.

    /work/venv/bin/python scripts/make_mmcv_export_fixtures.py tests/data/mmcv_export \
        tests/data/eg_video.safetensors:/tmp/eg_video.mmcv.safetensors ...

Needs torch, safetensors and mmcv-lite 2.2.0 (see tests/data/mmcv_export/README.md).
"""

import json
import struct
import sys
from pathlib import Path

import torch
from mmcv.cnn import NonLocal3d
from safetensors.torch import load_file, save_file


def metadata(path):
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]).get("__metadata__", {})


def main(out_dir, pairs):
    out_dir = Path(out_dir)
    for pair in pairs:
        case, export = pair.split(":")
        meta = metadata(case)
        assert meta["naming"] == "alexhex7" and meta["bn_layer"] == "true", case
        assert meta["sub_sample"] == "1,2,2" and meta.get("dims", "3") == "3", case
        c, ci = int(meta["in_channels"]), int(meta["inter_channels"])
        assert ci == max(c // 2, 1), "mmcv's inter channels are in_channels // reduction"
        module = NonLocal3d(
            c, reduction=2, use_scale=False, norm_cfg=dict(type="BN3d"), mode=meta["mode"], sub_sample=True
        ).double().eval()
        exported = load_file(export)
        # Strict: every key of mmcv's module and no other.
        module.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in exported.items()})
        x = load_file(case)["input"]
        with torch.no_grad():
            z = module(x.double().permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1).float().contiguous()
        tensors = dict(exported)
        tensors["input"] = x
        tensors["output"] = z
        meta_out = {k: meta[k] for k in ["mode", "in_channels", "inter_channels", "sub_sample", "bn_eps"] if k in meta}
        meta_out.update(
            naming="mmcv",
            prefix="",
            dims="3",
            use_scale="false",
            bn_layer="true",
            layout=meta.get("layout", "B,T,H,W,C"),
            made_by=f"mmcv {__import__('mmcv').__version__} NonLocal3d, strict load_state_dict of the crate's export",
            source_case=Path(case).name,
        )
        name = out_dir / (Path(case).stem + "_as_mmcv.safetensors")
        save_file(tensors, name, metadata=meta_out)
        print(f"{name}: {len(exported)} tensors, output max |z| {z.abs().max():.3g}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
