#!/usr/bin/env python3
"""Times the PyTorch non-local block (AlexHex7/Non-local_pytorch structure) on the shapes of
`examples/bench.rs`, printing lines in the same format, so the two can be compared side by side.

Not part of CI. Needs PyTorch:  pip install torch
Usage:  python3 scripts/bench_pytorch.py [--shape NAME] [--mode eg|dp|concat|gauss] [--threads 2] [--backward]

With --backward, each case adds a `pass=train` line timing forward + backward (gradients for
the input and every parameter; BatchNorm in eval form, as the Rust `forward_train` +
`backward`), like `examples/bench --backward`.

Each case runs in a fresh subprocess so its peak resident memory (`rss_mb`) is its own.
The sgemm reference here is torch.mm 2048^3 with the same thread count, for information; the
README's comparison uses the Rust bench's own probe and milliseconds.
"""
import argparse
import resource
import subprocess
import sys
import time

SHAPES = {
    "video-res4": (1024, 4, 14, 14),
    "video-res3": (512, 4, 28, 28),
    "detect-res4": (1024, 1, 50, 84),
    "video-res2": (256, 8, 56, 56),
}
MODES = {"eg": "embedded_gaussian", "dp": "dot_product", "concat": "concatenation", "gauss": "gaussian"}


def build_block(torch, mode, c):
    nn = torch.nn
    ci = c // 2

    class NonLocal3d(nn.Module):
        """AlexHex7's _NonLocalBlockND, 3d, sub_sample=True, bn_layer=True."""

        def __init__(self):
            super().__init__()
            self.g = nn.Sequential(nn.Conv3d(c, ci, 1), nn.MaxPool3d((1, 2, 2)))
            self.W = nn.Sequential(nn.Conv3d(ci, c, 1), nn.BatchNorm3d(c))
            if mode != "gaussian":
                self.theta = nn.Conv3d(c, ci, 1)
                self.phi = nn.Sequential(nn.Conv3d(c, ci, 1), nn.MaxPool3d((1, 2, 2)))
            else:
                self.phi = nn.MaxPool3d((1, 2, 2))
            if mode == "concatenation":
                self.concat_project = nn.Sequential(nn.Conv2d(2 * ci, 1, 1, bias=False), nn.ReLU())

        def forward(self, x):
            b = x.size(0)
            g_x = self.g(x).view(b, ci, -1).permute(0, 2, 1)
            if mode == "gaussian":
                theta_x = x.view(b, c, -1).permute(0, 2, 1)
                phi_x = self.phi(x).view(b, c, -1)
                f = torch.softmax(torch.matmul(theta_x, phi_x), dim=-1)
            elif mode == "embedded_gaussian":
                theta_x = self.theta(x).view(b, ci, -1).permute(0, 2, 1)
                phi_x = self.phi(x).view(b, ci, -1)
                f = torch.softmax(torch.matmul(theta_x, phi_x), dim=-1)
            elif mode == "dot_product":
                theta_x = self.theta(x).view(b, ci, -1).permute(0, 2, 1)
                phi_x = self.phi(x).view(b, ci, -1)
                f = torch.matmul(theta_x, phi_x) / phi_x.size(-1)
            else:
                theta_x = self.theta(x).view(b, ci, -1, 1)
                phi_x = self.phi(x).view(b, ci, 1, -1)
                h, w = theta_x.size(2), phi_x.size(3)
                theta_x = theta_x.repeat(1, 1, 1, w)
                phi_x = phi_x.repeat(1, 1, h, 1)
                f = self.concat_project(torch.cat([theta_x, phi_x], dim=1)).view(b, h, w) / w
            y = torch.matmul(f, g_x).permute(0, 2, 1).contiguous().view(b, ci, *x.size()[2:])
            return self.W(y) + x

    block = NonLocal3d().eval()
    nn.init.ones_(block.W[1].weight)
    return block


def nominal_flops(mode, c, n, m):
    ci = c // 2
    projections = 1 if mode == "gaussian" else 3
    d = {"embedded_gaussian": ci, "dot_product": ci, "gaussian": c, "concatenation": 2 * ci}[mode]
    return 2 * n * c * ci * projections + 2 * n * ci * c + 2 * n * m * d + 2 * n * m * ci


def run_case(shape, mode_key, threads, reps, backward):
    import torch

    torch.set_num_threads(threads)
    c, t, h, w = SHAPES[shape]
    mode = MODES[mode_key]
    n, m = t * h * w, t * (h // 2) * (w // 2)
    a = torch.randn(2048, 2048)
    best = min(_time(lambda: torch.mm(a, a)) for _ in range(5))
    peak = 2 * 2048**3 / best / 1e9
    del a
    block = build_block(torch, mode, c)
    x = torch.randn(1, c, t, h, w)
    with torch.no_grad():
        block(x)
        times = sorted(_time(lambda: block(x)) for _ in range(reps))
    med = times[len(times) // 2]
    gflops = nominal_flops(mode, c, n, m) / med / 1e9
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"shape={shape} mode={mode_key} ms={med * 1e3:.2f} gflops={gflops:.1f} "
        f"torch_mm_gflops={peak:.1f} pct_peak={100 * gflops / peak:.1f} rss_mb={rss_mb:.0f}",
        flush=True,
    )
    if backward:
        xg = x.clone().requires_grad_(True)
        grad = x * 0.5

        def step():
            block.zero_grad(set_to_none=True)
            xg.grad = None
            (block(xg) * grad).sum().backward()

        step()
        times = sorted(_time(step) for _ in range(reps))
        med = times[len(times) // 2]
        gflops = 3 * nominal_flops(mode, c, n, m) / med / 1e9
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"shape={shape} mode={mode_key} pass=train ms={med * 1e3:.2f} gflops={gflops:.1f} "
            f"torch_mm_gflops={peak:.1f} pct_peak={100 * gflops / peak:.1f} rss_mb={rss_mb:.0f}",
            flush=True,
        )


def _time(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=SHAPES)
    p.add_argument("--mode", choices=MODES)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--backward", action="store_true")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        run_case(args.shape, args.mode, args.threads, args.reps, args.backward)
        return
    for shape in SHAPES:
        if args.shape and shape != args.shape:
            continue
        for mode_key in MODES:
            if args.mode and mode_key != args.mode:
                continue
            cmd = [sys.executable, __file__, "--one", "--shape", shape, "--mode", mode_key,
                   "--threads", str(args.threads), "--reps", str(args.reps)] + (["--backward"] if args.backward else [])
            subprocess.run(cmd, check=False)


if __name__ == "__main__":
    main()
