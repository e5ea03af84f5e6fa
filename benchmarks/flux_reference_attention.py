"""Cost of the release's reference-pass attention layout (``python -m benchmarks.flux_reference_attention``).

With >= 2 subjects the release attends each subject's reference tokens to themselves in one 5-D
``scaled_dot_product_attention`` call (``[b, h, N, R, d]``), which SDPA computes on its math path; a batch of N
rows (4-D) takes the fused kernel and rounds differently in bfloat16. We follow the release (bit-exact), once
per call, in every one of the 57 blocks. This times one block's attention both ways at FLUX.1-dev's shape
(24 heads of 128, R = 1024 reference tokens at 512 px) on the current device.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from anystory.cli_options import add_device, add_subject_count


def time_layouts(subjects: int, dtype, device: str, repeats: int = 3) -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(subjects, 24, 1024, 128, dtype=dtype, device=device) for _ in range(3))
    five = [x.unsqueeze(0).transpose(1, 2) for x in (q, k, v)]  # [1, h, N, R, d]
    out = {}
    for name, args in (("4-D batch of N", (q, k, v)), ("5-D, as the release", five)):
        F.scaled_dot_product_attention(*args)
        times = []
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            F.scaled_dot_product_attention(*args)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        out[name] = min(times)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device(p)
    add_subject_count(p)
    args = p.parse_args(argv)
    for dtype in (torch.bfloat16, torch.float32):
        t = time_layouts(args.subjects, dtype, args.device)
        a, b = t.values()
        print(f"{args.device} {str(dtype)[6:]}, {args.subjects} subjects, one block: 4-D {a * 1000:.0f} ms, "
              f"5-D {b * 1000:.0f} ms (x{b / a:.1f}); x57 blocks, once per call: +{(b - a) * 57:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
