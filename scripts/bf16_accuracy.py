#!/usr/bin/env python3
"""Where bf16 may round in a non-local block: PyTorch's own bf16-autocast error against models of
this crate's bf16 pipelines, on random AlexHex7-style blocks (the study behind the README's
"bf16" table; not part of CI).

    /work/venv/bin/python scripts/bf16_accuracy.py eg|gauss|dp [SEED] [TRIALS] [-v]

For each random block (C in 8..128, T in 1..2, H, W in 4..15, pooling 1x2x2, BatchNorm) it runs
PyTorch's block under torch.autocast("cpu", dtype=torch.bfloat16), and numpy models (f64 with
chosen operands rounded to bf16, round to nearest even) of four designs, against the f64
result, and counts the blocks whose error breaks the contract
max|z - ref| / max(1, max|ref|) <= max(1.25 * torch_err, 4e-3), and the looser rule
Precision::Bf16Logits is tested with, max(2 * torch_err, 8e-3):

  all-bf16     every product's operands in bf16 (the logits too), W_z in bf16
  f32-logits   theta/phi projections and logits in f32, W_z in bf16
  crate        what Precision::Bf16 does: the value side in bf16, the logits and W_z in f32
  bf16-logits  what Precision::Bf16Logits does: the logits' operands in bf16 too, W_z in f32

and, per design, the ratio of its error to PyTorch's (median, 90th percentile, largest).

The models reproduce the kernels' errors on the golden cases to about three digits (the sums'
f32 rounding aside). Needs torch and numpy.
"""
import sys

import numpy as np
import torch

torch.set_num_threads(2)


def bf16(x):
    """x rounded to bf16 (nearest even), as f64 values."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(np.float32).astype(np.float64)


def exact(x):
    return np.asarray(x, np.float64)


def pool(x, t, h, w):
    c = x.shape[1]
    g = x.reshape(t, h, w, c)
    return g[:, : h // 2 * 2, : w // 2 * 2].reshape(t, h // 2, 2, w // 2, 2, c).max(axis=(2, 4)).reshape(-1, c)


def random_block(rng, c, t, h, w, amp):
    ci = max(c // 2, 1)
    p = dict(
        Wt=rng.normal(0, 1 / np.sqrt(c), (ci, c)), bt=rng.normal(0, 0.3, ci),
        Wp=rng.normal(0, 1 / np.sqrt(c), (ci, c)), bp=rng.normal(0, 0.3, ci),
        Wg=rng.normal(0, 1 / np.sqrt(c), (ci, c)), bg=rng.normal(0, 0.3, ci),
        Wz=rng.normal(0, 1 / np.sqrt(ci), (c, ci)), bz=rng.normal(0, 0.3, c),
        gam=rng.uniform(0.5, 1.5, c), bet=rng.normal(0, 0.3, c), mu=rng.normal(0, 0.3, c), var=rng.uniform(0.5, 2, c))
    p = {k: v.astype(np.float32).astype(np.float64) for k, v in p.items()}
    x = (rng.normal(0, amp, (t * h * w, c)) + rng.normal(0, 0.5, c)).astype(np.float32).astype(np.float64)
    return p, x


def model(p, x, mode, grid, rounded):
    """The block in f64 with the named operands rounded to bf16."""
    R = lambda name: bf16 if name in rounded else exact
    t, h, w = grid
    s = p['gam'] / np.sqrt(p['var'] + 1e-5)
    wz, bz = p['Wz'] * s[:, None], (p['bz'] - p['mu']) * s + p['bet']
    g = pool(R('x_g')(x) @ R('w_g')(p['Wg']).T + p['bg'], t, h, w)
    if mode == 'dp':
        th = R('x_qk')(x) @ R('w_qk')(p['Wt']).T + p['bt']
        ph = pool(R('x_g')(x) @ R('w_g')(p['Wp']).T + p['bp'], t, h, w)
        kv = R('v')(ph).T @ R('v')(g) / ph.shape[0]
        return R('y')(th) @ R('y')(kv @ wz.T) + bz + x
    if mode == 'eg':
        q = R('x_qk')(x) @ R('w_qk')(p['Wt']).T + p['bt']
        k = pool(R('x_qk')(x) @ R('w_qk')(p['Wp']).T + p['bp'], t, h, w)
    else:
        q, k = x, pool(x, t, h, w)
    logits = R('qk')(q) @ R('qk')(k).T
    weights = np.exp(logits - logits.max(1, keepdims=True))
    y = R('p')(weights) @ R('v')(g) / weights.sum(1, keepdims=True)
    return R('y')(y) @ R('w_z')(wz).T + bz + x


def torch_autocast(p, x, mode, grid):
    t, h, w = grid
    c = x.shape[1]
    tt = {k: torch.tensor(v, dtype=torch.float32) for k, v in p.items()}
    xt = torch.tensor(x, dtype=torch.float32).T.reshape(1, c, t, h, w)
    conv = lambda wt, b, y: torch.nn.functional.conv3d(y, wt[:, :, None, None, None], b)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        g = torch.nn.functional.max_pool3d(conv(tt['Wg'], tt['bg'], xt), (1, 2, 2))
        g = g.reshape(1, g.shape[1], -1).permute(0, 2, 1)
        if mode == 'gauss':
            th = xt.reshape(1, c, -1).permute(0, 2, 1)
            ph = torch.nn.functional.max_pool3d(xt, (1, 2, 2)).reshape(1, c, -1)
        else:
            th = conv(tt['Wt'], tt['bt'], xt).reshape(1, -1, t * h * w).permute(0, 2, 1)
            ph = torch.nn.functional.max_pool3d(conv(tt['Wp'], tt['bp'], xt), (1, 2, 2))
            ph = ph.reshape(1, ph.shape[1], -1)
        f = torch.matmul(th, ph)
        a = torch.softmax(f, -1) if mode != 'dp' else f / f.shape[-1]
        y = torch.matmul(a, g).permute(0, 2, 1).reshape(1, -1, t, h, w)
        z = conv(tt['Wz'], tt['bz'], y)
        z = torch.nn.functional.batch_norm(z, tt['mu'], tt['var'], tt['gam'], tt['bet'], False, 0.0, 1e-5)
        out = z + xt
    return out.double().reshape(c, -1).T.numpy()


DESIGNS = {
    'all-bf16': {'x_g', 'w_g', 'x_qk', 'w_qk', 'qk', 'p', 'v', 'y', 'w_z'},
    'f32-logits': {'x_g', 'w_g', 'p', 'v', 'y', 'w_z'},
    'crate': {'x_g', 'w_g', 'p', 'v'},
    'bf16-logits': {'x_g', 'w_g', 'x_qk', 'w_qk', 'qk', 'p', 'v'},
}


def main():
    args = [a for a in sys.argv[1:] if a != '-v']
    verbose = '-v' in sys.argv
    mode = args[0] if args else 'eg'
    rng = np.random.default_rng(int(args[1]) if len(args) > 1 else 7)
    trials = int(args[2]) if len(args) > 2 else 60
    fails = {k: 0 for k in DESIGNS}
    loose_fails = {k: 0 for k in DESIGNS}
    worst = dict.fromkeys(DESIGNS, 0.0)
    ratios = {name: [] for name in DESIGNS}
    for _ in range(trials):
        c = int(rng.choice([8, 12, 16, 32, 48, 64, 96, 128]))
        grid = (int(rng.choice([1, 2])), int(rng.integers(4, 16)), int(rng.integers(4, 16)))
        amp = float(rng.choice([0.5, 1.2, 2.0]))
        p, x = random_block(rng, c, *grid, amp)
        ref = model(p, x, mode, grid, set())
        scale = max(1.0, np.abs(ref).max())
        torch_err = np.abs(torch_autocast(p, x, mode, grid) - ref).max() / scale
        bound = max(1.25 * torch_err, 4e-3)
        loose = max(2.0 * torch_err, 8e-3)
        line = f"C={c:3d} grid={grid} amp={amp} torch={torch_err:.2e}"
        for name, rounded in DESIGNS.items():
            err = np.abs(model(p, x, mode, grid, rounded) - ref).max() / scale
            fails[name] += int(err > bound)
            loose_fails[name] += int(err > loose)
            worst[name] = max(worst[name], err / bound)
            ratios[name].append(err / torch_err)
            line += f"  {name}={err:.2e} ({err / bound:.2f} of bound)"
        if verbose:
            print(line)
    print(f"{mode}: {trials} blocks; fail the contract: {fails}; worst error / bound: "
          + ", ".join(f"{k} {v:.2f}" for k, v in worst.items()))
    print(f"  fail max(2 x torch, 8e-3): {loose_fails}")
    for name, r in ratios.items():
        r = np.array(r)
        print(f"  {name}: error / PyTorch's median {np.median(r):.2f}, p90 {np.quantile(r, 0.9):.2f}, max {r.max():.2f}")


if __name__ == '__main__':
    main()
