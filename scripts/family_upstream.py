"""Loads the upstream family modules that do not import as packages in a CPU-only environment.

- `criss_cross_attention()`: mmcv's `CrissCrossAttention` class. mmcv-lite 2.2.0 ships
  `mmcv/ops/cc_attention.py` (pure PyTorch since mmcv 1.3.13), but `import mmcv.ops` fails
  (`No module named 'mmcv._ext'`: the package __init__ imports the compiled ops too), so the
  one file is executed on its own from the installed package.
- `disentangled_non_local()`: mmsegmentation's `DisentangledNonLocal2d`. mmsegmentation is not
  installed (its package imports pull in much else); the class source is read at run time from
  the mmsegmentation wheel (`mmseg/models/decode_heads/dnl_head.py`), extracted with `ast` and
  executed with mmcv's `NonLocal2d` in its namespace. Nothing of it is stored in this repository.

The wheel is looked up in $MMSEG_WHEEL, then /work/venv-wheels/ and /tmp/ (download it with
`pip download --no-deps mmsegmentation==1.2.2`).
"""

import ast
import glob
import importlib.util
import os
import sys
import zipfile

_CACHE = {}
MMSEG_VERSION = "1.2.2"


def criss_cross_attention():
    """The `CrissCrossAttention` class of the installed mmcv (its `ops/cc_attention.py`)."""
    if "cc" not in _CACHE:
        import mmcv

        path = os.path.join(os.path.dirname(mmcv.__file__), "ops", "cc_attention.py")
        spec = importlib.util.spec_from_file_location("mmcv_ops_cc_attention_standalone", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _CACHE["cc"] = module.CrissCrossAttention
    return _CACHE["cc"]


def mmseg_wheel():
    """The path of the mmsegmentation wheel."""
    candidates = [os.environ.get("MMSEG_WHEEL", "")]
    for d in ("/work/venv-wheels", "/tmp", os.getcwd()):
        candidates += sorted(glob.glob(os.path.join(d, f"mmsegmentation-{MMSEG_VERSION}-*.whl")))
    for c in candidates:
        if c and os.path.isfile(c):
            return c
    raise FileNotFoundError(
        f"mmsegmentation-{MMSEG_VERSION} wheel not found: set MMSEG_WHEEL or run "
        f"`pip download --no-deps mmsegmentation=={MMSEG_VERSION} -d /work/venv-wheels`"
    )


def disentangled_non_local():
    """mmsegmentation's `DisentangledNonLocal2d` class, built from the wheel's source."""
    if "dnl" not in _CACHE:
        import torch
        from mmcv.cnn import NonLocal2d

        wheel = mmseg_wheel()
        src = zipfile.ZipFile(wheel).read("mmseg/models/decode_heads/dnl_head.py").decode()
        tree = ast.parse(src)
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DisentangledNonLocal2d")
        code = compile(ast.Module(body=[cls], type_ignores=[]), f"{wheel}!dnl_head.py", "exec")
        ns = {"torch": torch, "nn": torch.nn, "NonLocal2d": NonLocal2d, "__name__": "mmseg_dnl_standalone"}
        exec(code, ns)
        _CACHE["dnl"] = ns["DisentangledNonLocal2d"]
    return _CACHE["dnl"]
