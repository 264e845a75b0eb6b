"""Throughput and MFU: one formula for the training metrics (``perf/*``), the summary and the benchmarks.

``perf/mfu = 6 * N * tokens / elapsed / (world_size * peak)`` where ``N`` counts the parameters outside embedding
tables (6 = 2 FLOPs per multiply-add x (forward + 2 x backward)), ``tokens`` the real (non-pad) tokens of real
samples, and ``peak`` the device's dense peak for the run's precision (``PEAK_TFLOPS``). Documented in
``docs/wandb.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

# Dense (no sparsity) peak TFLOPS per GPU: (name pattern, bf16/fp16 tensor core, fp32). First match wins, so
# the more specific names come first. Sources: NVIDIA data sheets (SXM parts unless named).
PEAK_TFLOPS: list[tuple[str, float, float]] = [
    (r"H100.*(PCIe|PCIE)", 756.0, 51.2),
    (r"H100.*NVL", 835.0, 60.0),
    (r"H100|GH200", 989.4, 66.9),
    (r"H200", 989.4, 66.9),
    (r"A100", 312.0, 19.5),
    (r"A800", 312.0, 19.5),
    (r"L40S", 362.1, 91.6),
    (r"L40\b", 181.0, 90.5),
    (r"\bL4\b", 121.0, 30.3),
    (r"\bA10\b", 125.0, 31.2),
    (r"RTX A6000|A6000", 154.8, 38.7),
    (r"V100", 125.0, 15.7),  # fp16 (no bf16)
    (r"\bT4\b", 65.0, 8.1),  # fp16 (no bf16)
]


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of one device for the run's precision; None when unknown (CPU, unlisted GPUs)."""
    for pattern, half, single in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return (half if precision in ("bf16", "fp16") else single) * 1e12
    return None


class ParamCounter(Protocol):
    """What counting needs of the run's backend (train/engine/backends/; this layer sits below it)."""

    def param_numel(self, p: torch.Tensor) -> int: ...


def count_matmul_params(model: torch.nn.Module, backend: ParamCounter | None = None) -> int:
    """Parameters outside embedding tables (lookups cost no FLOPs), as the backend holds them (ZeRO-3 shards
    report their full size)."""
    import torch

    numel = backend.param_numel if backend is not None else torch.Tensor.numel
    skip = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(numel(p) for p in model.parameters() if id(p) not in skip)


@dataclass
class Throughput:
    """The FLOP figures of one run: ``flops_per_token`` (6 N), the device's ``peak`` (None: unknown), the world."""

    flops_per_token: float | None = None
    peak: float | None = None
    world: int = 1
    device: torch.device | None = None

    @classmethod
    def of(
        cls, model, device, device_name: str, precision: str, world: int, backend: ParamCounter | None = None
    ) -> Throughput:
        peak = peak_flops(device_name, precision) if device.type == "cuda" else None
        return cls(6.0 * count_matmul_params(model, backend), peak, world, device)

    def mfu(self, tokens: float, seconds: float) -> float | None:
        if not (self.peak and self.flops_per_token):
            return None
        return self.flops_per_token * tokens / max(seconds, 1e-9) / (self.world * self.peak)

    def window(self, tokens: float, padded: float, elapsed: float) -> dict[str, float]:
        """``perf/*`` and ``memory/*`` for a log window: ``tokens`` real tokens and ``padded`` token slots over
        all ranks in ``elapsed`` seconds. MFU only where the device peak is known, memory only on CUDA."""
        elapsed = max(elapsed, 1e-9)
        row = {"perf/tokens_per_s": tokens / elapsed, "perf/padding_efficiency": tokens / max(1.0, padded)}
        mfu = self.mfu(tokens, elapsed)
        if mfu is not None:
            row["perf/mfu"] = mfu
        if self.device is not None and self.device.type == "cuda":
            import torch

            row["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return row
