#!/usr/bin/env python3
"""Times the non-local block of `bench_pytorch.py` (AlexHex7 structure: Conv3d θ/φ/g, C' = C/2,
max-pool 1x2x2 sub-sampling of φ and g, W = conv + BatchNorm with non-zero weight, B = 1) in the
engines people deploy it with, one subprocess per engine, so each line's peak memory is its own.

Not part of CI. Needs /work/venv (torch, onnx, onnxruntime, openvino; timm, mmcv-lite and the
mmsegmentation wheel for --family, see scripts/family_upstream.py).

    python scripts/bench_engines.py [--shape NAME|--tiny] [--mode eg,dp,gauss,concat]
                                    [--engines eager,bf16,compile,sdpa,ort,ov_f32,ov_default]
                                    [--reps 5] [--threads 2]
    python scripts/bench_engines.py --family [--tiny] [--blocks context_block,...] [--reps 5]

Engines (all with 2 threads by default):
  eager       PyTorch eager float32, eval, no_grad
  bf16        PyTorch eager under torch.autocast('cpu', dtype=torch.bfloat16)
  compile     torch.compile(block) float32 (compile time reported as compile_s, not in ms;
              TORCHINDUCTOR_COMPILE_THREADS=1 unless set, so the compile stays in-process)
  sdpa        the eg/gauss attention core through F.scaled_dot_product_attention (scale 1, the
              same math: softmax(θφᵀ)g); dp and concat have no softmax, so it reports error=n/a
  ort         ONNX Runtime, model from torch.onnx.export(opset_version=17, dynamo=False);
              intra_op_num_threads=threads, inter_op_num_threads=1, ORT_ENABLE_ALL
  ov_f32      OpenVINO CPU, INFERENCE_PRECISION_HINT=f32
  ov_default  OpenVINO CPU, default precision (bf16 where the CPU has AVX512_BF16/AMX)
  (OpenVINO with INFERENCE_NUM_THREADS=threads, PERFORMANCE_HINT=LATENCY, reading the ONNX file)

Each line is `key=value` pairs, e.g.
  shape=video-res4 mode=eg engine=ort ms=12.34 gflops=... peak_rss_mb=... base_rss_mb=... precision=f32 max_abs_err=...
ms is the median of --reps timed runs after one warm-up. peak_rss_mb is the child's VmHWM
(before the reference output is loaded for the error check); base_rss_mb its VmRSS after the
imports and the input, before the engine (block, session, compiled model) was built; the
difference is what the engine itself took. (The torch children start near 0.7 GB: the CUDA
build of torch maps its libraries even on CPU.) max_abs_err is max |engine − eager f32|
and rel_err that over max |eager f32|. A failing or missing engine prints error=... instead.
The ONNX/OpenVINO children do not import torch (input, reference and model come from files
a preparing child wrote), so their memory is the runtime's own.

Timings are ratios within one sitting on one machine, never absolute claims.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = {
    "video-res4": (1024, 4, 14, 14),
    "video-res3": (512, 4, 28, 28),
    "detect-res4": (1024, 1, 50, 84),
    "video-res2": (256, 8, 56, 56),
    "tiny": (64, 1, 8, 8),
}
MODES = {"eg": "embedded_gaussian", "dp": "dot_product", "gauss": "gaussian", "concat": "concatenation"}
ENGINES = ["eager", "bf16", "compile", "sdpa", "ort", "ov_f32", "ov_default"]
TORCH_ENGINES = {"eager", "bf16", "compile", "sdpa"}
ONNX_ENGINES = {"ort", "ov_f32", "ov_default"}

# --family: the upstream modules at their bench shapes (B = 1)
FAMILY = {
    "context_block": dict(c=2048, h=25, w=42, what="mmcv ContextBlock ratio 1/4 att channel_add"),
    "global_context": dict(c=2048, h=25, w=42, what="timm GlobalContext defaults"),
    "disentangled": dict(c=512, h=64, w=128, what="mmseg DisentangledNonLocal2d reduction 2 T 0.05 use_scale BN"),
    "criss_cross_r1": dict(c=512, h=64, w=128, what="mmcv CrissCrossAttention recurrence 1"),
    "criss_cross_r2": dict(c=512, h=64, w=128, what="mmcv CrissCrossAttention recurrence 2"),
    "non_local": dict(c=512, h=64, w=128, what="timm NonLocalAttn defaults"),
}
FAMILY_TINY = dict(c=64, h=8, w=8)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the children.


def vm(field):
    """A /proc/self/status field in MiB (VmHWM: peak resident; VmRSS: now)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def median_ms(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e3


def word(text, limit=160):
    """`text` as one parseable value: no spaces or '='."""
    out = "".join(ch if ch.isalnum() or ch in "._:-/+()[],<>" else "_" for ch in str(text).strip())
    return out[:limit] or "unknown"


def estimate_gb(mode, c, n, m):
    """The biggest intermediates of the eager block, roughly (f32)."""
    ci = c // 2
    if mode == "concatenation":
        per = 4 * ci * n * m  # θ repeated, φ repeated, their concatenation (2C')
    else:
        per = 3 * n * m  # the pairwise matrix, its softmax, a copy
    return per * 4 / 2**30


def mem_available_gb():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


# ---------------------------------------------------------------------------------------------
# Children.


def child_prepare(spec):
    """Builds the block (seed 0), writes its state dict, the input, the eager f32 output and,
    when an ONNX engine is asked for, the ONNX model."""
    import numpy as np
    import torch

    sys.path.insert(0, HERE)
    from bench_pytorch import build_block

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    c, t, h, w = spec["dims"]
    block = build_block(torch, MODES[spec["mode"]], c)
    with torch.no_grad():  # BatchNorm with non-trivial running statistics
        bn = block.W[1]
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.1, 0.1)
    x = torch.randn(1, c, t, h, w)
    with torch.no_grad():
        ref = block(x)
    d = spec["dir"]
    torch.save(block.state_dict(), os.path.join(d, "block.pt"))
    np.save(os.path.join(d, "x.npy"), x.numpy())
    np.save(os.path.join(d, "ref.npy"), ref.numpy())
    result = {"ok": True}
    if spec["onnx"]:
        try:
            torch.onnx.export(block, (x,), os.path.join(d, "block.onnx"), opset_version=17, dynamo=False,
                              input_names=["x"], output_names=["z"])
        except Exception as e:  # noqa: BLE001 - reported in the ONNX engines' lines
            result["onnx_error"] = f"{type(e).__name__}:{e}"
    return result


def sdpa_forward(torch, block, x, mode, c):
    """bench_pytorch's block with its softmax attention through scaled_dot_product_attention."""
    F = torch.nn.functional
    b, ci = x.size(0), c // 2
    g = block.g(x).view(b, ci, -1).transpose(1, 2)  # (b, M, C')
    if mode == "gaussian":
        q = x.view(b, c, -1).transpose(1, 2)  # (b, N, C)
        k = block.phi(x).view(b, c, -1).transpose(1, 2)  # (b, M, C)
    else:
        q = block.theta(x).view(b, ci, -1).transpose(1, 2)
        k = block.phi(x).view(b, ci, -1).transpose(1, 2)
    y = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), g.unsqueeze(1), scale=1.0).squeeze(1)
    y = y.transpose(1, 2).reshape(b, ci, *x.shape[2:])
    return block.W(y) + x


def child_torch(spec):
    import numpy as np
    import torch

    sys.path.insert(0, HERE)
    from bench_pytorch import build_block

    torch.set_num_threads(spec["threads"])
    c = spec["dims"][0]
    mode = MODES[spec["mode"]]
    engine = spec["engine"]
    d = spec["dir"]
    x = torch.from_numpy(np.load(os.path.join(d, "x.npy")))
    base = vm("VmRSS")
    block = build_block(torch, mode, c)
    block.load_state_dict(torch.load(os.path.join(d, "block.pt")))
    block.eval()
    result = {"precision": "f32"}
    if engine == "eager":
        fn = lambda: block(x)  # noqa: E731
    elif engine == "bf16":
        result["precision"] = "bf16-autocast"

        def fn():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return block(x)
    elif engine == "compile":
        compiled = torch.compile(block)
        start = time.perf_counter()
        with torch.no_grad():
            compiled(x)
        result["compile_s"] = round(time.perf_counter() - start, 1)
        fn = lambda: compiled(x)  # noqa: E731
    elif engine == "sdpa":
        if mode not in ("embedded_gaussian", "gaussian"):
            return {"error": "n/a:sdpa_needs_a_softmax_mode(eg,gauss)"}
        fn = lambda: sdpa_forward(torch, block, x, mode, c)  # noqa: E731
    else:
        raise ValueError(engine)
    with torch.no_grad():
        result["ms"] = median_ms(fn, spec["reps"])
        result["peak_rss_mb"] = vm("VmHWM")
        out = fn().float().numpy()
    result["base_rss_mb"] = base
    return result, out


def child_ort(spec):
    import numpy as np
    import onnxruntime as ort

    d = spec["dir"]
    x = np.load(os.path.join(d, "x.npy"))
    base = vm("VmRSS")
    so = ort.SessionOptions()
    so.intra_op_num_threads = spec["threads"]
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(os.path.join(d, "block.onnx"), so, providers=["CPUExecutionProvider"])
    fn = lambda: sess.run(None, {"x": x})[0]  # noqa: E731
    result = {"precision": "f32", "ort_version": ort.__version__}
    result["ms"] = median_ms(fn, spec["reps"])
    result["peak_rss_mb"] = vm("VmHWM")
    result["base_rss_mb"] = base
    return result, fn()


def child_openvino(spec):
    import numpy as np
    import openvino as ov

    d = spec["dir"]
    x = np.load(os.path.join(d, "x.npy"))
    base = vm("VmRSS")
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": spec["threads"], "PERFORMANCE_HINT": "LATENCY"}
    if spec["engine"] == "ov_f32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = core.compile_model(core.read_model(os.path.join(d, "block.onnx")), "CPU", config)
    request = compiled.create_infer_request()
    out_port = compiled.output(0)

    def fn():
        return request.infer({0: x})[out_port]

    precision = compiled.get_property("INFERENCE_PRECISION_HINT")
    result = {"precision": word(getattr(precision, "get_type_name", lambda: str(precision))()),
              "ov_threads": compiled.get_property("INFERENCE_NUM_THREADS")}
    result["ms"] = median_ms(fn, spec["reps"])
    result["peak_rss_mb"] = vm("VmHWM")
    result["base_rss_mb"] = base
    return result, np.array(fn())


def child_family(spec):
    """One upstream family module, forward (no_grad) or forward + backward (eval BatchNorm)."""
    import torch

    sys.path.insert(0, HERE)
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    name, c, h, w = spec["block"], spec["c"], spec["h"], spec["w"]
    recurrence = 1
    if name == "context_block":
        from mmcv.cnn import ContextBlock

        make = lambda: ContextBlock(c, 1 / 4, "att", ("channel_add",))  # noqa: E731
    elif name == "global_context":
        from timm.layers import GlobalContext

        make = lambda: GlobalContext(c)  # noqa: E731
    elif name == "disentangled":
        import family_upstream

        dnl = family_upstream.disentangled_non_local()
        make = lambda: dnl(c, reduction=2, use_scale=True, norm_cfg=dict(type="BN"),  # noqa: E731
                           mode="embedded_gaussian", temperature=0.05)
    elif name.startswith("criss_cross"):
        import family_upstream

        cca = family_upstream.criss_cross_attention()
        make = lambda: cca(c)  # noqa: E731
        recurrence = int(name[-1])
    elif name == "non_local":
        from timm.layers import NonLocalAttn

        make = lambda: NonLocalAttn(c)  # noqa: E731
    else:
        raise ValueError(name)
    x = torch.randn(1, c, h, w)
    base = vm("VmRSS")
    m = make()
    m.eval()
    with torch.no_grad():  # every part non-trivial (upstream inits zero some last layers)
        for p in m.parameters():
            p.uniform_(-0.05, 0.05)

    def forward(inp):
        for _ in range(recurrence):
            inp = m(inp)
        return inp

    result = {}
    if spec["pass"] == "forward":
        with torch.no_grad():
            result["ms"] = median_ms(lambda: forward(x), spec["reps"])
    else:
        xg = x.clone().requires_grad_(True)
        grad = torch.randn(x.shape)

        def step():
            m.zero_grad(set_to_none=True)
            xg.grad = None
            (forward(xg) * grad).sum().backward()

        result["ms"] = median_ms(step, spec["reps"])
    result["peak_rss_mb"] = vm("VmHWM")
    result["base_rss_mb"] = base
    return result


def child_main(spec):
    """Runs one child job and prints one `RESULT {json}` line."""
    try:
        kind = spec["kind"]
        if kind == "prepare":
            result = child_prepare(spec)
        elif kind == "family":
            result = child_family(spec)
        else:
            engine = spec["engine"]
            if engine in TORCH_ENGINES:
                got = child_torch(spec)
            elif engine == "ort":
                got = child_ort(spec)
            else:
                got = child_openvino(spec)
            if isinstance(got, dict):
                result = got
            else:
                result, out = got
                import numpy as np

                ref = np.load(os.path.join(spec["dir"], "ref.npy"))
                out = np.asarray(out, dtype=np.float32).reshape(ref.shape)
                err = float(np.abs(out - ref).max())
                result["max_abs_err"] = f"{err:.3g}"
                result["rel_err"] = f"{err / max(float(np.abs(ref).max()), 1e-30):.3g}"
    except Exception as e:  # noqa: BLE001 - reported as error=...
        traceback.print_exc(file=sys.stderr)
        result = {"error": f"{type(e).__name__}:{e}"}
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# The parent.


def run_child(spec, env=None, timeout=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout_after_{timeout}s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
    why = "killed(SIGKILL:likely_out_of_memory)" if p.returncode == -9 else f"exit_{p.returncode}"
    return {"error": f"{why}:{tail}"}


def fmt(pairs, result):
    parts = [f"{k}={v}" for k, v in pairs]
    if "error" in result:
        parts.append(f"error={word(result['error'])}")
    else:
        for k in ("ms", "gflops", "peak_rss_mb", "base_rss_mb", "precision", "compile_s", "max_abs_err", "rel_err",
                  "ort_version", "ov_threads"):
            if k in result:
                v = result[k]
                parts.append(f"{k}={v:.2f}" if k == "ms" else (f"{k}={v:.0f}" if k.endswith("_mb") else f"{k}={v}"))
    return " ".join(parts)


def bench_block(args):
    sys.path.insert(0, HERE)
    from bench_pytorch import nominal_flops

    shapes = ["tiny"] if args.tiny else ([args.shape] if args.shape else [s for s in SHAPES if s != "tiny"])
    modes = args.mode.split(",") if args.mode else list(MODES)
    engines = args.engines.split(",") if args.engines else ENGINES
    for e in engines:
        if e not in ENGINES:
            sys.exit(f"unknown engine {e!r}; choose from {','.join(ENGINES)}")
    for shape in shapes:
        c, t, h, w = SHAPES[shape]
        n, m = t * h * w, t * (h // 2) * (w // 2)
        for mode_key in modes:
            mode = MODES[mode_key]
            need, avail = estimate_gb(mode, c, n, m), mem_available_gb()
            if need > 0.8 * avail:
                skip = {"error": f"skipped:needs_about_{need:.0f}GB,{avail:.0f}GB_available"}
                for e in engines:
                    print(fmt([("shape", shape), ("mode", mode_key), ("engine", e)], skip), flush=True)
                continue
            d = tempfile.mkdtemp(prefix=f"bench_engines_{shape}_{mode_key}_")
            try:
                base = dict(dims=[c, t, h, w], mode=mode_key, threads=args.threads, reps=args.reps, dir=d)
                prep = run_child(dict(base, kind="prepare", onnx=bool(ONNX_ENGINES & set(engines))))
                for e in engines:
                    pairs = [("shape", shape), ("mode", mode_key), ("engine", e)]
                    if "error" in prep:
                        result = {"error": f"prepare_failed:{prep['error']}"}
                    elif e in ONNX_ENGINES and "onnx_error" in prep:
                        result = {"error": f"onnx_export_failed:{prep['onnx_error']}"}
                    else:
                        env = dict(os.environ)
                        if e == "compile":
                            env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
                        result = run_child(dict(base, kind="engine", engine=e), env=env, timeout=args.timeout)
                    if "ms" in result:
                        result["gflops"] = f"{nominal_flops(mode, c, n, m) / (result['ms'] / 1e3) / 1e9:.1f}"
                    print(fmt(pairs, result), flush=True)
            finally:
                shutil.rmtree(d, ignore_errors=True)


def bench_family(args):
    blocks = args.blocks.split(",") if args.blocks else list(FAMILY)
    for name in blocks:
        if name not in FAMILY:
            sys.exit(f"unknown family block {name!r}; choose from {','.join(FAMILY)}")
        dims = dict(FAMILY_TINY) if args.tiny else {k: FAMILY[name][k] for k in ("c", "h", "w")}
        for pass_ in ("forward", "train"):
            spec = dict(kind="family", block=name, threads=args.threads, reps=args.reps, **dims)
            spec["pass"] = pass_
            result = run_child(spec, timeout=args.timeout)
            shape = f"{dims['c']}x{dims['h']}x{dims['w']}"
            print(fmt([("family", name), ("shape", shape), ("pass", pass_), ("engine", "eager")], result), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES)
    p.add_argument("--tiny", action="store_true", help="the tiny shape only (C 64, T 1, H 8, W 8): a smoke test")
    p.add_argument("--mode", help="comma-separated subset of eg,dp,gauss,concat")
    p.add_argument("--engines", help=f"comma-separated subset of {','.join(ENGINES)}")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=int, default=3600, help="seconds per engine child")
    p.add_argument("--family", action="store_true", help="time the upstream family modules instead")
    p.add_argument("--blocks", help=f"with --family: comma-separated subset of {','.join(FAMILY)}")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_main(json.loads(args.child))
    elif args.family:
        bench_family(args)
    else:
        bench_block(args)


if __name__ == "__main__":
    main()
