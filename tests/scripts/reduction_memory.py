"""Time and peak memory of ``reduce_tensor`` on 100M-value CPU tensors, one case per process.

Run as ``python tests/scripts/reduction_memory.py [n]`` (default ``n = 100_000_000``). For each case
(float32 with one NaN, finite float32, fp16, bf16, int32, a transposed float32 view, float32
values near 1e30 with one NaN, whose squares leave float32's range: the general path) a fresh
process builds the tensor, resets its peak RSS (``/proc/self/clear_refs``), reduces it once with
64 bins and prints the wall time and the peak RSS above the RSS before the call.
"""

from __future__ import annotations

import subprocess
import sys
import time

CASES = (
    "float32-one-nan",
    "float32",
    "float16",
    "bfloat16",
    "int32",
    "float32-transposed",
    "float32-huge-one-nan",
)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def _make(case: str, n: int):
    import torch

    g = torch.Generator().manual_seed(0)
    if case == "int32":
        return torch.randint(-1000, 1000, (n,), dtype=torch.int32, generator=g)
    if case == "float32-transposed":
        side = int(n**0.5)
        return torch.randn(side, side, generator=g).t()
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(case, torch.float32)
    x = torch.randn(n, generator=g, dtype=dtype)
    if case in ("float32-one-nan", "float32-huge-one-nan"):
        x[n // 2] = float("nan")
    if case == "float32-huge-one-nan":
        x.mul_(1e30)
    return x


def run_case(case: str, n: int) -> None:
    """Build, reduce and report one case in this process."""
    import torch

    from lightning_inspect.core.stats import reduce_tensor

    torch.set_num_threads(1)
    reduce_tensor(torch.randn(1000), bins=64)  # imports and first-call costs
    x = _make(case, n)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    reduce_tensor(x, bins=64)
    seconds = time.perf_counter() - start
    extra_mib = (_rss_kib("VmHWM") - before) / 1024
    print(f"{case:20s} {x.numel():>11,d} values  {seconds:7.3f} s  peak RSS +{extra_mib:8.1f} MiB")


def main() -> None:
    if len(sys.argv) > 2:
        run_case(sys.argv[2], int(sys.argv[1]))
        return
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000_000
    for case in CASES:
        subprocess.run([sys.executable, __file__, str(n), case], check=True)


if __name__ == "__main__":
    main()
