#!/usr/bin/env python3
"""Writes the small `.pth` test files of tests/data/pth/fixtures (needs torch and safetensors;
not part of CI: the files are committed).

    pip install torch safetensors numpy
    python3 scripts/make_pth_fixtures.py

Each `<name>.pth` that holds tensors comes with `<name>.expected.safetensors`: every tensor of
its state dict as torch reads it, contiguous (floats as F32, integers as I64), for the Rust
tests to compare with exactly. `hostile_*.pth` are hand-built archives that must be refused.
Made with torch 2.15 (the version is not pinned: the formats are stable).
"""

import argparse
import collections
import io
import os
import pickle
import struct
import sys
import types
import zipfile

import numpy as np
import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "pth", "fixtures")


def expected(name, state_dict):
    """The state dict's tensors, contiguous, as the Rust reader must see them."""
    tensors = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            continue
        v = v.detach()
        tensors[k] = (v.to(torch.float32) if v.is_floating_point() else v.to(torch.int64)).contiguous().clone()
    save_file(tensors, os.path.join(OUT, f"{name}.expected.safetensors"))


def views():
    """Several tensors in one storage: slices, transposes, offsets, broadcasts; and other dtypes."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(3, 4, 5, generator=g)
    half = torch.randn(4, 6, generator=g).half()
    return collections.OrderedDict(
        full=base,
        slice=base[1:, 1:3, ::2],
        transposed=base.permute(2, 0, 1),
        row=base[2, 1],
        scalar=base[1, 2, 3],
        broadcast=base[0, 0, :].expand(4, 5),
        empty=base[:, :0],
        half_t=half.t(),
        half_col=half[:, 3],
        bf16=torch.randn(2, 3, generator=g).bfloat16(),
        double=torch.randn(3, 2, generator=g).double()[::2],
        long=torch.arange(-5, 5)[::3],
        int32=torch.arange(6, dtype=torch.int32).reshape(2, 3).t(),
        uint8=torch.arange(250, 256, dtype=torch.uint8),
        flag=torch.tensor([True, False, True]),
    )


def storage_sizes(zip_bytes):
    """Element size of every storage key of a torch zip, read off its pickle (nothing built)."""
    z = zipfile.ZipFile(io.BytesIO(zip_bytes))
    pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
    sizes = {}

    class Reader(pickle.Unpickler):
        def persistent_load(self, pid):
            sizes[pid[2]] = torch.tensor([], dtype=pid[1].dtype).element_size()
            return None

        def find_class(self, module, name):
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return lambda *a: None
            return super().find_class(module, name)

    Reader(io.BytesIO(z.read(pkl))).load()
    return sizes


def big_endian(zip_bytes):
    """The same archive with `byteorder` = big and every storage byte-swapped, as torch writes
    on a big-endian machine."""
    sizes = storage_sizes(zip_bytes)
    src = zipfile.ZipFile(io.BytesIO(zip_bytes))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            folder, _, rest = info.filename.partition("/")
            if rest == "byteorder":
                data = b"big"
            elif rest.startswith("data/"):
                n = sizes[rest[len("data/"):]]
                a = np.frombuffer(data, dtype=np.dtype(f"<u{n}") if n > 1 else np.uint8)
                data = a.byteswap().tobytes()
            dst.writestr(info.filename, data)
    return out.getvalue()


def save(name, obj, **kwargs):
    path = os.path.join(OUT, f"{name}.pth")
    torch.save(obj, path, **kwargs)
    return path


class Reduce:
    """An object pickled as `callable(*args)`: how a file makes torch.load call something."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def fake_class(module, name):
    """A class that pickles under `module.name` without that package installed."""
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    mod = sys.modules[module]
    cls = type(name, (), {"__module__": module})
    setattr(mod, name, cls)
    return cls


def block_state_dict(prefix, c=8, ci=4, seed=5):
    """An AlexHex7 embedded-Gaussian block (pooled, BatchNorm) under `prefix`."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    sd = collections.OrderedDict()
    for name in ["g.0", "theta", "phi.0"]:
        sd[f"{prefix}{name}.weight"] = r(ci, c, 1, 1, 1)
        sd[f"{prefix}{name}.bias"] = r(ci)
    sd[f"{prefix}W.0.weight"] = r(c, ci, 1, 1, 1)
    sd[f"{prefix}W.0.bias"] = r(c)
    sd[f"{prefix}W.1.weight"] = r(c)
    sd[f"{prefix}W.1.bias"] = r(c)
    sd[f"{prefix}W.1.running_mean"] = r(c)
    sd[f"{prefix}W.1.running_var"] = r(c).abs() + 0.5
    sd[f"{prefix}W.1.num_batches_tracked"] = torch.tensor(17)
    return sd


def training_checkpoints():
    # mmengine-style: objects of classes nobody here knows, numpy arrays, a Counter, and one
    # that would run a shell command under torch.load(weights_only=False).
    history = fake_class("mmengine.logging.history_buffer", "HistoryBuffer")()
    history.data = np.arange(4.0)
    sd = block_state_dict("module.backbone.nl.")
    sd["module.backbone.conv.weight"] = torch.randn(8, 3, 1, 1, 1)
    ckpt = {
        "meta": {"epoch": 3, "seed": np.int64(7), "hist": history, "counts": collections.Counter("aab"),
                 "hook": Reduce(os.system, ("echo this must never run",))},
        "state_dict": sd,
        "message_hub": {"log_scalars": {"loss": history}},
        "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]},
    }
    save("train_mmengine", ckpt)
    expected("train_mmengine", sd)
    # torchvision reference scripts: {'model': …, 'optimizer': …, 'args': Namespace}.
    sd = block_state_dict("", seed=9)
    save("train_torchvision", {"model": sd, "optimizer": {"state": {}}, "epoch": 4,
                               "args": argparse.Namespace(lr=0.1)})
    expected("train_torchvision", sd)


def write_zip(name, pkl, storages, folder="archive", byteorder=b"little"):
    with zipfile.ZipFile(os.path.join(OUT, f"{name}.pth"), "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{folder}/data.pkl", pkl)
        z.writestr(f"{folder}/byteorder", byteorder)
        for key, data in storages.items():
            z.writestr(f"{folder}/data/{key}", data)


class Storage:
    def __init__(self, key, numel, cls="FloatStorage"):
        self.key, self.numel, self.cls = key, numel, cls


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", getattr(torch, obj.cls), obj.key, "cpu", obj.numel)
        return None


def dumps(obj, protocol=2):
    buf = io.BytesIO()
    Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def hostile():
    """Archives that lie about sizes, offsets and strides, or nest without end."""
    data = struct.pack("<16f", *range(16))
    s = Storage("0", 16)

    def one(name, tensor, storage_bytes=data):
        write_zip(name, dumps({"theta.weight": tensor}), {"0": storage_bytes})

    one("hostile_storage_larger_than_file", Tensor(Storage("0", 1 << 40), 0, [4], [1]))
    one("hostile_tensor_past_storage", Tensor(s, 0, [100], [1]))
    one("hostile_huge_offset", Tensor(s, 1 << 62, [2], [1]))
    one("hostile_huge_stride", Tensor(s, 0, [2, 2], [1 << 61, 1]))
    one("hostile_negative_stride", Tensor(s, 15, [4], [-1]))
    one("hostile_shape_overflow", Tensor(s, 0, [1 << 40, 1 << 40, 1 << 20], [0, 0, 0]))
    one("hostile_missing_storage", Tensor(Storage("7", 16), 0, [4], [1]))
    # A damaged storage: its CRC no longer matches.
    write_zip("hostile_crc", dumps({"theta.weight": Tensor(s, 0, [16], [1])}), {"0": data})
    path = os.path.join(OUT, "hostile_crc.pth")
    raw = bytearray(open(path, "rb").read())
    raw[raw.index(data) + 5] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    # 100 000 nested lists around the state dict.
    depth = 100_000
    pkl = b"\x80\x02" + b"](" * depth + b"e" * depth + b"."
    write_zip("hostile_deep_nesting", pkl, {})
    # A legacy stream cut inside its storage data.
    legacy = io.BytesIO()
    torch.save(block_state_dict(""), legacy, _use_new_zipfile_serialization=False)
    open(os.path.join(OUT, "hostile_legacy_truncated.pth"), "wb").write(legacy.getvalue()[:-40])


def main():
    os.makedirs(OUT, exist_ok=True)
    sd = views()
    expected("views", sd)
    zip_path = save("views_zip", sd)
    save("views_legacy", sd, _use_new_zipfile_serialization=False)
    save("views_zip_protocol4", sd, pickle_protocol=4)
    save("views_legacy_protocol4", sd, pickle_protocol=4, _use_new_zipfile_serialization=False)
    big = big_endian(open(zip_path, "rb").read())
    open(os.path.join(OUT, "views_zip_bigendian.pth"), "wb").write(big)
    # torch itself reads the big-endian archive back to the same values.
    back = torch.load(io.BytesIO(big), weights_only=True)
    assert all(torch.equal(back[k], v) for k, v in sd.items()), "big-endian round trip"
    for name in ["views_zip", "views_legacy", "views_zip_protocol4", "views_legacy_protocol4"]:
        # (weights_only=True cannot read protocol 4 frames; these files are our own.)
        back = torch.load(os.path.join(OUT, f"{name}.pth"), weights_only=False)
        assert all(torch.equal(back[k], v) for k, v in sd.items()), name
    training_checkpoints()
    # Types that are never read, in both formats: open fine, refused only when read.
    odd = {"complex": torch.randn(3, dtype=torch.complex64), "after": torch.arange(4.0)}
    save("odd_dtypes_zip", odd)
    save("odd_dtypes_legacy", odd, _use_new_zipfile_serialization=False)
    # torch.save(model): a pickled module object, not a state dict.
    save("whole_model", torch.nn.Conv2d(2, 3, 1))
    hostile()
    for f in sorted(os.listdir(OUT)):
        print(f"{os.path.getsize(os.path.join(OUT, f)):8d} {f}")


if __name__ == "__main__":
    main()
