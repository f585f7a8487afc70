#!/usr/bin/env python3
"""Times mmcv's ContextBlock and timm's GlobalContext (GCNet's global context block) at the
shape and configurations of `examples/bench --block gc`, printing lines in the same format,
so the two can be compared side by side.

Not part of CI. Needs torch, mmcv-lite 2.2.0 (or mmcv) and timm.
Usage:  python3 scripts/bench_gc.py [--threads 2] [--reps 100] [--backward]

Shape: ResNet-50 stage 4 at detection size, x (1, 2048, 25, 42) float32, NCHW (PyTorch's
layout; the Rust block takes the same data channels last). Configurations:
  mmcv-r16-add  mmcv ContextBlock(2048, 1/16)                  (attention pooling, add fusion)
  mmcv-r4-add   mmcv ContextBlock(2048, 1/4)
  timm-scale    timm GlobalContext(2048)                        (attention pooling, scale fusion, rd 1/8)
Every parameter is random (the upstream inits zero some, which could let work be skipped).

Per configuration: `ms` is the median no_grad forward, `copy_ms` the median of `y.copy_(x)`
(read + write of x) timed interleaved with it in this process, `pct_copy` their ratio; with
--backward a `pass=train` line times forward + backward of sum(out * g) (gradients for x and
every parameter), as the Rust bench's forward_train + backward.
"""
import argparse
import time

import torch

C, H, W = 2048, 25, 42


def build(name):
    if name.startswith("mmcv"):
        from mmcv.cnn import ContextBlock

        ratio = {"mmcv-r16-add": 1.0 / 16.0, "mmcv-r4-add": 0.25}[name]
        return ContextBlock(C, ratio)
    from timm.layers import GlobalContext

    return GlobalContext(C)


def randomise(block):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            fan_in = p.shape[1] if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def interleaved_medians(reps, fns):
    times = [[] for _ in fns]
    for _ in range(reps + 1):
        for t, fn in zip(times, fns):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [sorted(t[1:])[len(t[1:]) // 2] for t in times]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--backward", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(1, C, H, W)
    y = torch.empty_like(x)
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} x_mb={x.numel() * 4 / 1e6:.1f}", flush=True)
    for name in ["mmcv-r16-add", "mmcv-r4-add", "timm-scale"]:
        block = build(name).eval()
        randomise(block)

        def forward():
            with torch.no_grad():
                block(x)

        copy, fwd = interleaved_medians(args.reps, [lambda: y.copy_(x), forward])
        print(
            f"shape=detect-res5 block=gc config={name} ms={fwd * 1e3:.3f} copy_ms={copy * 1e3:.3f} "
            f"pct_copy={100 * copy / fwd:.1f}",
            flush=True,
        )
        if args.backward:
            xg = x.clone().requires_grad_(True)
            grad = x * 0.5

            def step():
                block.zero_grad(set_to_none=True)
                xg.grad = None
                (block(xg) * grad).sum().backward()

            copy, train = interleaved_medians(max(5, args.reps // 5), [lambda: y.copy_(x), step])
            print(
                f"shape=detect-res5 block=gc config={name} pass=train ms={train * 1e3:.3f} copy_ms={copy * 1e3:.3f} "
                f"pct_copy={100 * copy / train:.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
