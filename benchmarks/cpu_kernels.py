"""CPU matmul kernels for quantized weights, measured on this machine: a decode step (1 row) and a prefill (2048 rows).

SmolLM2-135M's projection shapes (576→1536, 1536→576 and the 576→49,152 head) through: the fp32
matmul; bf16; int8 weight-only (``aten._weight_int8pack_mm``, bf16 activations); int4 weight-only
in groups of 32 and 64 (``aten._weight_int4pack_mm_for_cpu``, bf16 activations); and dynamic int8
(``torch.ao.quantization.quantize_dynamic``, W8A8, deprecated in torch 2.13). Each variant's weight
is copied until the copies fill more memory than the caches hold and the calls rotate through them,
as a decode step reads every weight from memory once; one small weight reused from the cache would
flatter the kernels. Figures are medians in µs per call with the speedup against fp32, and each
kernel's largest error against the fp32 product of its own de-quantised weight (relative to the
largest output), so a fast wrong kernel shows. One process, 1 and 2 threads.

    python benchmarks/cpu_kernels.py [--threads 1,2] [--rows 1,2048] [--calls 60]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from common import write_result

SHAPES = [(576, 1536), (1536, 576), (576, 49152)]  # (in, out)
ROTATE_BYTES = 256 * 2**20  # more than the last-level cache of the machines this runs on


def _int4_weight(w: torch.Tensor, group: int) -> tuple[tuple, torch.Tensor]:
    """Asymmetric int4 in groups along the input: (packed weight, scales and zeros) and the de-quantised weight."""
    out, inp = w.shape
    grouped = w.view(out, inp // group, group)
    low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    scale = (high - low).clamp_min(1e-8) / 15
    q = ((grouped - low) / scale).round().clamp(0, 15).to(torch.int32).view(out, inp)
    dequant = (q.view(out, inp // group, group).float() * scale + low).view(out, inp)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    # the kernel computes (q - 8) · scale + zero, so zero is the group's value at q = 8
    zeros = low + 8 * scale
    scales_zeros = torch.stack([scale.view(out, -1).t(), zeros.view(out, -1).t()], -1).to(torch.bfloat16).contiguous()
    return (packed, scales_zeros), dequant


def _int8_weight(w: torch.Tensor) -> tuple[tuple, torch.Tensor]:
    """Symmetric int8 per output channel: (weight, scales) and the de-quantised weight."""
    scale = w.abs().amax(1).clamp_min(1e-8) / 127
    q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return (q, scale.to(torch.bfloat16)), q.float() * scale[:, None]


def variants(w: torch.Tensor) -> dict[str, tuple]:
    """name -> (make one weight copy, call(x, weight), activation dtype, de-quantised weight)."""
    found = {"fp32": (lambda: w.clone(), lambda x, c: x @ c.t(), torch.float32, w),
             "bf16": (lambda: w.to(torch.bfloat16), lambda x, c: x @ c.t(), torch.bfloat16, w.to(torch.bfloat16).float())}
    int8, dq8 = _int8_weight(w)
    found["int8 weight-only"] = (lambda: tuple(t.clone() for t in int8),
                                 lambda x, c: torch.ops.aten._weight_int8pack_mm(x, c[0], c[1]), torch.bfloat16, dq8)
    for group in (32, 64):
        int4, dq4 = _int4_weight(w, group)
        found[f"int4 g{group} weight-only"] = (
            lambda int4=int4: tuple(t.clone() for t in int4),
            lambda x, c, group=group: torch.ops.aten._weight_int4pack_mm_for_cpu(x, c[0], group, c[1]),
            torch.bfloat16, dq4)
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w.clone()

    def dynamic():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantize_dynamic is deprecated in torch 2.13; measured as the W8A8 peer
            return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear},
                                                          dtype=torch.qint8)

    reference = dynamic()
    found["dynamic int8 (W8A8)"] = (dynamic, lambda x, c: c(x), torch.float32,
                                    reference[0].weight().dequantize())
    return found


def _bytes(copy) -> int:
    """Bytes of one weight copy (a quantized Linear counts its int8 weight)."""
    if isinstance(copy, torch.Tensor):
        return copy.numel() * copy.element_size()
    if isinstance(copy, tuple):
        return sum(_bytes(t) for t in copy)
    return copy[0].weight().numel()


@torch.no_grad()
def measure(w: torch.Tensor, rows: int, calls: int) -> dict[str, dict]:
    """Median µs per call and relative error of every variant for ``rows`` rows of input."""
    x32 = torch.randn(rows, w.shape[1])
    exact = {}
    results = {}
    for name, (make, call, act_dtype, dequant) in variants(w).items():
        first = make()
        copies = [first] + [make() for _ in range(max(1, ROTATE_BYTES // max(_bytes(first), 1)) - 1)]
        x = x32.to(act_dtype)
        out = call(x, first).float()
        exact = x32.to(act_dtype).float() @ dequant.t()
        error = ((out - exact).abs().max() / exact.abs().max().clamp_min(1e-12)).item()
        for c in copies[:3]:
            call(x, c)  # warm-up
        times = []
        n = calls if rows == 1 else max(3, calls // 20)
        for k in range(n):
            start = time.perf_counter()
            call(x, copies[k % len(copies)])
            times.append((time.perf_counter() - start) * 1e6)
        results[name] = {"us": statistics.median(times), "copies": len(copies), "calls": n, "rel_error": error}
        del copies
    base = results["fp32"]["us"]
    for r in results.values():
        r["speedup"] = base / r["us"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rows", default="1,2048")
    parser.add_argument("--calls", type=int, default=60, help="timed calls per variant at 1 row (fewer at more rows)")
    args = parser.parse_args()
    torch.manual_seed(0)
    runs, table = [], []
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for rows in map(int, args.rows.split(",")):
            for inp, out in SHAPES:
                w = torch.randn(out, inp) * inp**-0.5
                found = measure(w, rows, args.calls)
                runs.append({"threads": threads, "rows": rows, "in": inp, "out": out, "variants": found})
                cells = ", ".join(f"{name} {r['us']:,.0f} µs ({r['speedup']:.2f}×, err {r['rel_error']:.1e})"
                                  for name, r in found.items())
                table.append((f"{threads} thread(s), {rows} row(s), {inp}→{out}", cells))
                print(table[-1][0], "|", cells, flush=True)
    write_result("cpu_kernels", {"shapes": SHAPES, "rotate_bytes": ROTATE_BYTES, "runs": runs}, table)


if __name__ == "__main__":
    main()
