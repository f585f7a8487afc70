#!/usr/bin/env python3
"""Times mmcv's PyTorch CrissCrossAttention (CCNet) at the shape of `examples/bench.rs --block cc`
(C = 512, H = 64, W = 128: CCNet's head on a Cityscapes 512x1024 crop at stride 8), recurrence 1
and 2 (the module applied r times, as mmseg's CCHead), printing lines in the same format.

Not part of CI. Needs torch and mmcv-lite 2.2.0 (mmcv.ops' package init wants the compiled `_ext`
that mmcv-lite lacks, so the module file is loaded by path; it is pure PyTorch since mmcv 1.3.13).
Usage:  python3 scripts/bench_cc.py [--threads 2] [--reps 5] [--backward]

Each case runs in a fresh subprocess so its peak resident memory (`rss_mb`, the whole process,
torch itself included; `base_mb` is the process before the first call) is its own. Nominal FLOPs
are those of `cc_flops` in examples/bench.rs; `pass=train` is forward + backward with gradients
for the input and every parameter, `gflops` = 3 x nominal / ms as the Rust bench; `min_ms` is the
fastest run (steadier than the median on a shared machine).
"""
import argparse
import importlib.util
import resource
import subprocess
import sys
import time

SHAPES = {"seg-stride8": (512, 64, 128)}


def load_module_class():
    import mmcv

    path = mmcv.__path__[0] + "/ops/cc_attention.py"
    spec = importlib.util.spec_from_file_location("mmcv_cc_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CrissCrossAttention


def cc_flops(c, h, w, r):
    qk, n, keys = c // 8, h * w, h + w - 1
    return r * (2 * n * c * (2 * qk + c) + 2 * n * keys * qk + 2 * n * keys * c)


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(shape, recurrence, threads, reps, backward):
    import torch

    torch.set_num_threads(threads)
    c, h, w = SHAPES[shape]
    a = torch.randn(2048, 2048)
    best = min(_time(lambda: torch.mm(a, a)) for _ in range(5))
    peak = 2 * 2048**3 / best / 1e9
    del a
    torch.manual_seed(0)
    block = load_module_class()(c).eval()
    with torch.no_grad():
        block.gamma.scale.fill_(0.5)
    x = torch.randn(1, c, h, w)
    base = rss_mb()

    def forward(inp):
        for _ in range(recurrence):
            inp = block(inp)
        return inp

    with torch.no_grad():
        forward(x)
        times = sorted(_time(lambda: forward(x)) for _ in range(reps))
    med = times[len(times) // 2]
    gflops = cc_flops(c, h, w, recurrence) / med / 1e9
    print(
        f"shape={shape} block=cc impl=mmcv recurrence={recurrence} ms={med * 1e3:.2f} gflops={gflops:.1f} "
        f"torch_mm_gflops={peak:.1f} pct_peak={100 * gflops / peak:.1f} rss_mb={rss_mb():.0f} base_mb={base:.0f} "
        f"min_ms={times[0] * 1e3:.2f}",
        flush=True,
    )
    if backward:
        xg = x.clone().requires_grad_(True)
        grad = x * 0.5

        def step():
            block.zero_grad(set_to_none=True)
            xg.grad = None
            (forward(xg) * grad).sum().backward()

        step()
        times = sorted(_time(step) for _ in range(reps))
        med = times[len(times) // 2]
        gflops = 3 * cc_flops(c, h, w, recurrence) / med / 1e9
        print(
            f"shape={shape} block=cc impl=mmcv recurrence={recurrence} pass=train ms={med * 1e3:.2f} "
            f"gflops={gflops:.1f} torch_mm_gflops={peak:.1f} pct_peak={100 * gflops / peak:.1f} "
            f"rss_mb={rss_mb():.0f} base_mb={base:.0f} min_ms={times[0] * 1e3:.2f}",
            flush=True,
        )


def _time(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=SHAPES, default="seg-stride8")
    p.add_argument("--recurrence", type=int, choices=[1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--backward", action="store_true")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        run_case(args.shape, args.recurrence, args.threads, args.reps, args.backward)
        return
    for recurrence in [1, 2]:
        if args.recurrence and recurrence != args.recurrence:
            continue
        cmd = [sys.executable, __file__, "--one", "--shape", args.shape, "--recurrence", str(recurrence),
               "--threads", str(args.threads), "--reps", str(args.reps)] + (["--backward"] if args.backward else [])
        subprocess.run(cmd, check=False)


if __name__ == "__main__":
    main()
