"""Dense scaled dot-product attention: time, peak memory and matmul efficiency.

For each N, one run measures
- forward and forward+backward time of ``attention_forward/backward``,
- their tracemalloc peak memory,
- the time of the six matrix products that attention does (Q K^T and P V
  forward; dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q backward), timed
  alone on the same shapes: this is "the matmul throughput measured in the
  same run". matmul fraction = matmul-only time / forward+backward time, i.e.
  the achieved share of NumPy's matmul throughput on these shapes;
- when PyTorch is importable, ``torch.nn.functional.scaled_dot_product_attention``
  forward+backward on the same inputs, and our time divided by PyTorch's.

Attention does 12 N M D floating-point operations in its products (4 N M D
forward, 8 N M D backward); GFLOP/s below counts only those.
"""

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

from ..commands import help_description
from ..core import kernels
from ..core.kernels import backend
from ..transformer import attention_backward, attention_forward
from .harness import (
    best_time,
    format_bytes,
    format_table,
    machine_description,
    peak_memory,
    positive_int,
    positive_int_list,
    write_json,
)


def matmul_only_time(q, k, v, dout, repeat):
    """Time the six products of attention forward+backward on the same shapes, alone."""
    scores = q @ np.swapaxes(k, -1, -2)  # (..., N, M), stands in for P and dS

    def products():
        s = q @ np.swapaxes(k, -1, -2)  # Q K^T
        s @ v  # P V
        np.swapaxes(scores, -1, -2) @ dout  # dV = P^T dO
        dout @ np.swapaxes(v, -1, -2)  # dP = dO V^T
        scores @ k  # dQ = dS K
        np.swapaxes(scores, -1, -2) @ q  # dK = dS^T Q

    return best_time(products, repeat=repeat)


# Times PyTorch SDPA forward+backward on the arrays saved in an .npz file and
# prints "seconds version", or prints nothing when PyTorch is not importable.
TORCH_SCRIPT = """
import sys, time
import numpy as np
try:
    import torch
    import torch.nn.functional as F
except ImportError:
    raise SystemExit(0)
arrays = np.load(sys.argv[1])
causal, repeat = sys.argv[2] == "causal", int(sys.argv[3])
q, k, v = (torch.from_numpy(arrays[name]).requires_grad_(True) for name in ("q", "k", "v"))
dout = torch.from_numpy(arrays["dout"])
best = float("inf")
for _ in range(repeat):
    for tensor in (q, k, v):
        tensor.grad = None
    begin = time.perf_counter()
    F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(dout)
    best = min(best, time.perf_counter() - begin)
print(best, torch.__version__)
"""


def torch_time(q, k, v, dout, causal, repeat):
    """Time PyTorch SDPA forward+backward on the same inputs; return (seconds, version) or (None, None).

    PyTorch runs in a child process with the environment the user started
    with. miniattn's kernels set OMP_WAIT_POLICY=PASSIVE in this process (see
    miniattn.core.kernels), and an OpenMP runtime shared with PyTorch would
    slow PyTorch's kernels: SDPA forward+backward at N = 2048 took 31.5 ms
    instead of 20.8 ms in one process with miniattn imported first.
    """
    environment = dict(os.environ)
    if kernels.WAIT_POLICY_SET_HERE:
        environment.pop("OMP_WAIT_POLICY", None)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "inputs.npz")
        np.savez(path, q=q, k=k, v=v, dout=dout)
        result = subprocess.run(
            [sys.executable, "-c", TORCH_SCRIPT, path, "causal" if causal else "bidirectional", str(repeat)],
            capture_output=True, text=True, env=environment, check=False,
        )
    if result.returncode != 0:
        raise RuntimeError(f"timing PyTorch failed (exit code {result.returncode}): {result.stderr.strip()}")
    if not result.stdout.strip():
        return None, None
    seconds, version = result.stdout.split()
    return float(seconds), version


def measure(n, width, dtype, causal, repeat, rng):
    q, k, v = (rng.standard_normal((1, 1, n, width)).astype(dtype) for _ in range(3))
    dout = rng.standard_normal((1, 1, n, width)).astype(dtype)

    def forward():
        return attention_forward(q, k, v, causal=causal)

    def forward_backward():
        out, cache = attention_forward(q, k, v, causal=causal)
        return attention_backward(dout, cache)

    forward_time = best_time(forward, repeat=repeat)
    total_time = best_time(forward_backward, repeat=repeat)
    _, peak = peak_memory(forward_backward)
    products_time = matmul_only_time(q, k, v, dout, repeat)
    torch_seconds, torch_version = torch_time(q, k, v, dout, causal, repeat)
    flops = 12.0 * n * n * width
    row = {
        "N": n,
        "forward_s": forward_time,
        "forward_backward_s": total_time,
        "peak_bytes": peak,
        "matmul_only_s": products_time,
        "matmul_fraction": products_time / total_time,
        "gflops": flops / total_time / 1e9,
        "matmul_gflops": flops / products_time / 1e9,
    }
    if torch_seconds is not None:
        row["torch_forward_backward_s"] = torch_seconds
        row["time_vs_torch"] = total_time / torch_seconds
        row["torch_version"] = torch_version
    return row


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m miniattn bench --suite dense", description=help_description(__doc__))
    parser.add_argument("--n", type=positive_int_list, help="comma-separated N (default 512,1024,2048,4096,8192)")
    parser.add_argument("--d", type=positive_int, default=64, help="head width D (default 64)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--causal", action="store_true", help="causal attention (default bidirectional)")
    parser.add_argument("--repeat", type=positive_int, help="timing repeats, minimum reported (default 5)")
    parser.add_argument("--quick", action="store_true", help="only N = 512 and 2048, 3 repeats (not with --n or --repeat)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)

    if args.quick and (args.n is not None or args.repeat is not None):
        parser.error("--quick sets N and the repeats itself; leave out --n and --repeat, or --quick")
    if args.quick:
        sizes, repeat = [512, 2048], 3
    else:
        sizes = args.n or [512, 1024, 2048, 4096, 8192]
        repeat = args.repeat or 5
    rng = np.random.default_rng(0)
    print(f"machine: {machine_description()}, kernels: {backend()}")
    print(f"dense attention, (1, 1, N, {args.d}) {args.dtype}, {'causal' if args.causal else 'bidirectional'}, best of {repeat}")
    rows = [measure(n, args.d, np.dtype(args.dtype), args.causal, repeat, rng) for n in sizes]

    columns = ["N", "forward", "forward+backward", "peak memory", "GFLOP/s", "matmul GFLOP/s", "matmul fraction"]
    if any("torch_forward_backward_s" in row for row in rows):
        columns += ["torch fwd+bwd", "time / torch"]
    table = []
    for row in rows:
        entry = {
            "N": row["N"],
            "forward": f"{row['forward_s'] * 1e3:.1f} ms",
            "forward+backward": f"{row['forward_backward_s'] * 1e3:.1f} ms",
            "peak memory": format_bytes(row["peak_bytes"]),
            "GFLOP/s": f"{row['gflops']:.1f}",
            "matmul GFLOP/s": f"{row['matmul_gflops']:.1f}",
            "matmul fraction": f"{row['matmul_fraction']:.2f}",
        }
        if "torch_forward_backward_s" in row:
            entry["torch fwd+bwd"] = f"{row['torch_forward_backward_s'] * 1e3:.1f} ms"
            entry["time / torch"] = f"{row['time_vs_torch']:.2f}"
        table.append(entry)
    print(format_table(table, columns))
    if not any("torch_forward_backward_s" in row for row in rows):
        print("PyTorch is not installed here: no PyTorch comparison (it is never a dependency).")
    write_json(args.json, {"machine": machine_description(), "suite": "dense", "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(None))
