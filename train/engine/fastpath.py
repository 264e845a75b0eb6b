"""The fast path: compiled, CUDA-graphed steps over bucketed padding, with fused AdamW.

At effective batch 16, BERT fine-tuning is bound by per-step overhead (kernel launches, Python, host-device
syncs), not by FLOPs. On CUDA (under a backend that allows it) this module, when ``fast.enabled`` allows it:

- compiles forward + per-sample loss (and so, through AOTAutograd, the backward) with ``torch.compile``;
  ``mode="reduce-overhead"`` replays each graph as a CUDA graph (one launch instead of hundreds);
- pads every batch to one of a few bucket lengths (``fast.bucket_multiple`` or ``fast.buckets``) so only a
  few shapes are ever compiled; the batch dimension is already constant (the batch plan pads each micro-batch
  to ``per_device_batch_size`` rows with weight-0 rows), and eval batches are padded to ``eval.batch_size``
  rows here (the largest evaluated split's rows when fewer); all shapes are compiled up front
  (``fast.precompile``) and any compile after that is logged as a recompile;
- swaps the optimizer to ``torch.optim.AdamW(fused=True)`` (one kernel for all parameters);
- needs no host-device sync inside a step: loss and grad norm stay in the loop's device accumulators
  (``Window``, read every ``train.log_every`` steps) and ``clip_grad_norm_`` scales without reading the norm.

Where it cannot apply it degrades to the eager code path and logs the reason once: on CPU (``auto``), under
a backend that rules it out (``Backend.fast_path_off``, e.g. an engine that owns backward and the optimizer
step), or when switched off (``fast.enabled=false``).
``fast.enabled=true`` forces compilation on CPU too (inductor's C++ backend, or ``fast.backend=aot_eager``),
which is how the CPU tests check the compiled graphs against eager.

Bucketed padding does not change the math for the real tokens: padded key positions get an additive
``-inf``-like mask and the classifier reads position 0 only; ``tests/test_fastpath.py`` checks it.

Time to result: compiling costs minutes with a cold cache, seconds with a warm one, and the compiled
step saves tens of milliseconds per step, so for a short run on a cold cache the eager loop reaches its results
first. ``fast.enabled=auto`` weighs the two (:func:`auto_pays_off`) with the run's planned optimizer steps and
the state of the shared compile cache (train/engine/compile_cache.py), logs the reason, and takes the eager step when
compiling cannot pay off.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from train.config import Config
from train.data.batches import Inputs, Layout
from train.engine.compile_cache import CacheState, CompileCache, compile_key, lookups_since
from train.engine.compile_cache import cache_dir as compile_cache_dir
from train.engine.compile_cache import counters as cache_counters
from train.errors import ConfigError

if TYPE_CHECKING:
    from train.engine.backends import Backend

log = logging.getLogger(__name__)

LOSS_KEYS = ("labels", "weight")  # besides the model's own inputs (``Inputs.model_keys``)


def bucket_lengths(max_length: int, multiple: int, fixed: list[int] | None = None) -> tuple[int, ...]:
    """The padded lengths a batch may have: ``fixed`` (capped) or every multiple of ``multiple``, plus max_length."""
    out = {b for b in fixed if 0 < b < max_length} if fixed else set(range(multiple, max_length, multiple))
    out.add(max_length)  # tokenization truncates to max_length, so every row fits the last bucket
    return tuple(sorted(out))


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``length`` tokens (the longest bucket if none does)."""
    i = bisect.bisect_left(buckets, length)
    return buckets[min(i, len(buckets) - 1)] if length <= buckets[-1] else length


@dataclass
class Decision:
    """What the fast path does on this run, and why (logged once at setup)."""

    enabled: bool
    reason: str
    compile: bool = False
    mode: str | None = None  # torch.compile mode (inductor only)
    backend: str = "inductor"
    cudagraphs: bool = False
    fused_adamw: bool = False
    buckets: tuple[int, ...] | None = None
    dynamic: bool = False  # one graph over every bucket length (sequence dimension symbolic)
    cache: CompileCache | None = None  # the shared compile cache and this run's compile key
    cache_state: CacheState | None = None  # what it held before compiling

    @property
    def shapes(self) -> int:
        """The graphs compiling costs: train and eval, per bucket (or once each with ``dynamic``)."""
        return 2 if self.dynamic else 2 * len(self.buckets or ())

    def describe(self) -> str:
        if not self.enabled:
            return f"fast path off: {self.reason}"
        parts = [
            f"compile backend={self.backend} mode={self.mode}" if self.compile else "no compile",
            f"CUDA graphs {'on' if self.cudagraphs else 'off'}",
            f"fused AdamW {'on' if self.fused_adamw else 'off'}",
            f"padding buckets {list(self.buckets or ())}"
            + (" (one graph for all lengths)" if self.dynamic and self.compile else ""),
        ]
        return f"fast path on ({self.reason}): " + ", ".join(parts)


def _check_backend(name: str) -> None:
    """fast.backend names a torch.compile backend of this torch (torch would say so at the first compile)."""
    from torch._dynamo import list_backends

    known = sorted({*list_backends(exclude_tags=()), "inductor"})
    if name not in known:
        raise ConfigError(
            f"fast.backend={name!r} is not a torch.compile backend here; choose one of {', '.join(known)}"
        )


def decide(
    cfg: Config,
    device: torch.device,
    backend_off: str,
    world: int,
    steps: int | None = None,
    cache: CacheState | None = None,
) -> Decision:
    """Whether and how to use the fast path on this device and backend (``backend_off``: why the backend rules
    it out, ``Backend.fast_path_off``; empty when it does not).

    With ``steps`` (the run's planned optimizer steps) and ``cache`` (the compile cache's state for this run),
    ``fast.enabled=auto`` also asks whether compiling pays off (:func:`auto_pays_off`) and takes the eager path
    when it cannot; ``fast.enabled=true`` always compiles.
    """
    fc = cfg.fast
    cuda = device.type == "cuda"
    if fc.enabled is False:
        return Decision(False, "fast.enabled=false")
    if backend_off:
        return Decision(False, f"{backend_off}; eager path")
    if fc.enabled == "auto" and not cuda:
        return Decision(
            False, f"no CUDA device ({device.type}); eager path (fast.enabled=true forces compile)"
        )
    reason = "fast.enabled=true" if fc.enabled is True else "auto: CUDA, and the backend allows it"
    mode = fc.compile_mode
    if mode == "auto":
        # CUDA graphs under DDP are untested here (no multi-GPU machine); plain compile is the safe default.
        mode = "reduce-overhead" if cuda and world == 1 else "default"
        if cuda and world > 1:
            reason += (
                f"; CUDA graphs off with {world} processes (untested under DDP; "
                "fast.compile_mode=reduce-overhead turns them on)"
            )
    if fc.compile:
        _check_backend(fc.backend)
    if fc.backend != "inductor":
        mode = None  # modes are inductor options; other backends (aot_eager, eager) take none
    cudagraphs = cuda and fc.compile and mode in ("reduce-overhead", "max-autotune")
    buckets = bucket_lengths(cfg.data.max_length, fc.bucket_multiple, fc.buckets)
    dynamic = fc.dynamic and fc.compile and len(buckets) > 1
    if fc.enabled == "auto" and fc.compile and steps is not None and cache is not None:
        pays, why = auto_pays_off(device.type, steps, 2 if dynamic else 2 * len(buckets), cache)
        if not pays:
            return Decision(False, why)
        reason += f"; {why}"
    return Decision(
        True,
        reason,
        compile=fc.compile,
        mode=mode,
        backend=fc.backend,
        cudagraphs=cudagraphs,
        fused_adamw=fc.fused_adamw and device.type in ("cuda", "cpu"),
        buckets=buckets,
        dynamic=dynamic,
    )


# ``fast.enabled=auto``'s cost model. Measured where the comment says; bench/README.md has the runs, and
# ``bench/compare_trainer.py --end-to-end`` measures them per machine.
# Cold compile of one (bucket x train/eval) shape: cuda from an H200 on 2026-12-04 (bert-base, bf16,
# reduce-overhead, torch 2.11: 8 shapes in 180.6 s); cpu from 2 EPYC cores (tiny model, inductor).
COLD_S_PER_SHAPE = {"cuda": 22.6, "cpu": 40.0}
# A warm cache's compile time / a cold one's. cpu: 23 s / 333 s (tiny model, 8 shapes). cuda: not measured yet;
# on the H200 the warm run had not finished 78 s after it started (cold: 215 s, 35 s of it not compiling),
# so its compile took over 43 s, a quarter of the cold one at least.
WARM_FRACTION = {"cuda": 0.25, "cpu": 0.1}
# Eager step - compiled step: H200, bert-base, bf16, batch 16, RTE: 38.97 s / 780 steps eager vs 7.66 s compiled
# with CUDA graphs (50.0 vs 9.8 ms). None on CPU (the compiled step was slower there).
SAVED_S_PER_STEP = {"cuda": 0.040}


def estimate_compile_s(device_type: str, shapes: int, cache: CacheState) -> tuple[float, str]:
    """Seconds compiling ``shapes`` shapes will take before the first step, and where the number comes from."""
    if cache.warm and cache.warm_s is not None:
        return cache.warm_s, "warm cache, as measured the last time"
    if not cache.warm and cache.cold_s is not None:
        return cache.cold_s, "cold cache, as measured the last time"
    cold = cache.cold_s if cache.cold_s is not None else shapes * COLD_S_PER_SHAPE.get(device_type, 40.0)
    if cache.warm:
        fraction = WARM_FRACTION.get(device_type, 0.25)
        return cold * fraction, f"warm cache: {fraction:g} x the cold compile"
    return cold, f"cold cache: {shapes} shapes x {COLD_S_PER_SHAPE.get(device_type, 40.0):g} s"


def auto_pays_off(device_type: str, steps: int, shapes: int, cache: CacheState) -> tuple[bool, str]:
    """``fast.enabled=auto``'s rule: compile only if the time it saves exceeds the time it costs.

    cost = the estimated compile seconds (:func:`estimate_compile_s`: this compile key's last measured compile
    in the same cache state, else ``shapes x COLD_S_PER_SHAPE``, times ``WARM_FRACTION`` on a warm cache);
    saving = ``steps x SAVED_S_PER_STEP``. Compile when saving > cost. Eval steps are not counted (a small share
    of a GLUE run), which leans towards eager. Returns the verdict and the reason the log shows.
    """
    cost, source = estimate_compile_s(device_type, shapes, cache)
    per_step = SAVED_S_PER_STEP.get(device_type, 0.0)
    saving = steps * per_step
    numbers = (
        f"compiling {shapes} shapes ~{cost:.0f} s ({source}) vs ~{saving:.0f} s saved over {steps} steps "
        f"(~{1e3 * per_step:.0f} ms/step)"
    )
    if saving > cost:
        return True, f"auto: compiling pays off: {numbers}"
    return False, (
        f"auto: compiling cannot pay off for this run, eager path: {numbers}; "
        "fast.enabled=true compiles anyway (and fills the compile cache for the next run)"
    )


def planned_steps(cfg: Config, train_rows: int, effective_batch: int) -> int:
    """The run's optimizer steps, as the loop counts them (epochs x steps per epoch, capped by max_steps)."""
    total = -(-train_rows // effective_batch) * cfg.train.epochs
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def decide_for_run(
    cfg: Config,
    acc: Any,
    layout: Layout,
    model: torch.nn.Module,
    inputs: Inputs,
    regression: bool,
    train_rows: int,
    backend: Backend,
    eval_rows: int | None = None,
) -> Decision:
    """:func:`decide` for a real run: its planned steps and the compile cache's state for its compile key.

    Where a compile may happen, the shared cache folder is activated (before any compile of this process) and
    its state read; every rank takes the same path (one eager vote makes all ranks eager).
    """
    from train.engine import dist

    off, world = backend.fast_path_off, layout.world
    first = decide(cfg, acc.device, off, world)
    if not (first.enabled and first.compile):
        return first
    cache = CompileCache(
        compile_cache_dir(cfg.fast.cache_dir, cfg.data.cache_dir),
        *_compile_key(
            cfg,
            first,
            dist.device_name(acc),
            model,
            inputs,
            regression,
            layout,
            acc.mixed_precision,
            rows=layout.rows_per_forward(train_rows),
            eval_rows=eval_rows,
        ),
    )
    state = cache.prepare()
    steps = planned_steps(cfg, train_rows, layout.effective)
    d = decide(cfg, acc.device, off, world, steps, state)
    if dist.any_rank(not d.enabled) and d.enabled:  # cache states may differ while another run writes it
        d = Decision(False, "auto: another rank found compiling would not pay off; eager path")
    d.cache, d.cache_state = (cache, state) if d.enabled else (None, None)
    return d


def _compile_key(
    cfg: Config,
    d: Decision,
    device_name: str,
    model: torch.nn.Module,
    inputs: Inputs,
    regression: bool,
    layout: Layout,
    precision: str,
    rows: int | None = None,
    eval_rows: int | None = None,
) -> tuple[str, dict]:
    """What decides the compiled graphs of this run (not seeds, learning rates or data): its hash and parts."""
    import transformers

    from train.engine.compile_cache import environment_parts, model_parts

    skip = ("_name_or_path", "transformers_version", "id2label", "label2id")  # names only: same graphs
    config = {k: v for k, v in model.config.to_dict().items() if k not in skip}
    config["num_labels"] = model.config.num_labels
    parts = {
        **environment_parts(),  # torch, python, triton, CUDA versions; launcher; compile environment variables
        "transformers": transformers.__version__,
        "device": device_name,
        **model_parts(model),  # class, code, forward signature, attention implementation, dtypes
        "model_config": config,
        "inputs": list(inputs.model_keys),
        "regression": regression,
        "buckets": list(d.buckets or ()),
        "train_rows": rows or layout.per_device,  # rows of one forward (fewer when the data are fewer)
        "accum": layout.accum,  # with CUDA graphs it decides where gradients live (FastPath.set_to_none)
        "eval_rows": eval_rows or cfg.eval.batch_size,  # rows of one eval forward (fewer for fewer data)
        "precision": precision,  # what the run computes in (cfg.precision may say auto)
        "backend": d.backend,
        "mode": d.mode,
        "cudagraphs": d.cudagraphs,
        "dynamic": d.dynamic,
        "world": layout.world,
    }
    return compile_key(parts), parts


def use_fused_adamw(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same AdamW (same groups and hyper-parameters) with ``fused=True``; other optimizers unchanged."""
    if type(optimizer) is not torch.optim.AdamW or optimizer.state:
        log.info(
            "fast path: optimizer %s kept (fused AdamW applies to a fresh torch.optim.AdamW only)",
            type(optimizer).__name__,
        )
        return optimizer
    groups = [{k: v for k, v in g.items() if k not in ("foreach", "fused")} for g in optimizer.param_groups]
    return torch.optim.AdamW(groups, fused=True)


@dataclass
class FastPath:
    """The step functions the loop calls; eager wrappers when the fast path is off.

    ``train_losses(batch)``: per-sample losses of one micro-batch (forward + loss, compiled as one graph).
    ``eval_logits(batch)``: logits of one eval batch (padded to ``eval_rows`` rows when compiled).
    """

    decision: Decision
    forward: Callable[[dict], torch.Tensor]  # batch -> logits (the loop's ``forward``)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> per-sample losses
    eval_rows: int
    accum: int = 1
    inputs: Inputs = field(default_factory=Inputs)  # the fields a batch feeds the model (train/model/load.py)
    _train: Callable | None = None
    _eval: Callable | None = None
    shapes: dict[str, set] = field(default_factory=lambda: {"train": set(), "eval": set()})
    graphs_at_start: int = 0
    warm: bool = False  # True once every bucket shape has been compiled (precompile or first use)
    recompiles: int = 0
    warmup_s: float = 0.0
    compile_s: float | None = (
        None  # seconds compiling before the first step (None: compiled lazily, not timed)
    )
    cache_lookups: dict | None = None  # the compile cache's hits/misses during that compile

    def __post_init__(self) -> None:
        d = self.decision
        if not (d.enabled and d.compile):
            return
        import torch._dynamo.config as dcfg

        # one graph per (bucket, train/eval); the limit is per code object, so give it room and no more
        n = len(d.buckets or ()) + 2
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dcfg, name):
                setattr(dcfg, name, max(getattr(dcfg, name), n))
        self.graphs_at_start = compiled_graphs()
        kwargs: dict = {
            "backend": d.backend,
            "dynamic": None if d.dynamic else False,
        }  # None: mark_dynamic rules
        if d.mode is not None:
            kwargs["mode"] = d.mode
        fwd, loss = self.forward, self.loss

        def train_losses(batch: dict) -> torch.Tensor:
            return loss(fwd(batch), batch["labels"])

        def eval_logits(batch: dict) -> torch.Tensor:
            return fwd(batch)

        self._train = torch.compile(train_losses, **kwargs)
        self._eval = torch.compile(eval_logits, **kwargs)

    # -- properties the loop reads

    @property
    def compiled(self) -> bool:
        return self._train is not None

    @property
    def set_to_none(self) -> bool:
        """``zero_grad(set_to_none=...)``. With CUDA graphs and accumulation the gradients must live outside the
        graph pool (the next replay overwrites it), so they stay allocated and are accumulated into in place."""
        return not (self.decision.cudagraphs and self.accum > 1)

    @property
    def buckets(self) -> tuple[int, ...] | None:
        return self.decision.buckets if self.decision.enabled else None

    # -- the step functions

    def train_losses(self, batch: dict) -> torch.Tensor:
        if self._train is None:
            return self.loss(self.forward(batch), batch["labels"])
        return self._call("train", self._train, batch)

    def eval_logits(self, batch: dict) -> torch.Tensor:
        if self._eval is None:
            return self.forward(batch)
        n = batch["input_ids"].shape[0]
        if n < self.eval_rows:  # the last eval batch: pad rows (copies of row 0) so the shape stays constant
            batch = {
                k: _pad_rows(v, self.eval_rows) if torch.is_tensor(v) and v.dim() else v
                for k, v in batch.items()
            }
        logits = self._call("eval", self._eval, batch)
        return logits[:n]

    def _call(self, kind: str, fn: Callable, batch: dict) -> torch.Tensor:
        shape = tuple(batch["input_ids"].shape)
        new_shape = shape not in self.shapes[kind]
        before = compiled_graphs()
        if self.decision.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # outputs of the previous replay are no longer read
        args = {k: batch[k] for k in (*self.inputs.model_keys, *LOSS_KEYS)}
        if self.decision.dynamic:
            for t in args.values():
                if torch.is_tensor(t) and t.dim() >= 2:  # (rows, length): only the length varies
                    torch._dynamo.mark_dynamic(t, 1)
        out = fn(args)
        if compiled_graphs() != before:
            if new_shape:
                log.info(
                    "fast path: compiled %s shape %s (%d graphs so far)", kind, shape, self.graph_count()
                )
            else:
                self.recompiles += 1
                log.warning(
                    "fast path: RECOMPILED %s shape %s (a guard failed; %d recompiles so far)",
                    kind,
                    shape,
                    self.recompiles,
                )
            if self.warm and new_shape:
                self.recompiles += 1
                log.warning("fast path: new shape %s after warm-up (%s not in the bucket set?)", shape, kind)
        self.shapes[kind].add(shape)
        if kind == "eval" and self.decision.cudagraphs:
            out = out.clone()  # the caller keeps it past the next replay
        return out

    def graph_count(self) -> int:
        """Graphs compiled by dynamo since this fast path was built (all kinds and shapes)."""
        return compiled_graphs() - self.graphs_at_start

    def metrics(self) -> dict[str, float]:
        if not self.compiled:
            return {}
        return {"perf/compiled_graphs": self.graph_count(), "perf/recompiles": self.recompiles}

    def run_info(self) -> dict:
        """run_info.json's ``fast_path``, ``compile_s`` and ``compile_cache``."""
        d = self.decision
        if not self.compiled:
            return {"fast_path": d.describe(), "compile_s": 0.0, "compile_cache": None}
        lookups = self.cache_lookups or {}
        cache = {
            "dir": str(d.cache.folder) if d.cache else None,
            "key": d.cache.key if d.cache else None,
            "warm_before": d.cache_state.warm if d.cache_state else None,
            "mega_loaded": d.cache_state.mega_loaded if d.cache_state else None,
            "hits": sum(v["hits"] for v in lookups.values()) if lookups else None,
            "misses": sum(v["misses"] for v in lookups.values()) if lookups else None,
            "lookups": lookups or None,  # per torch cache: fxgraph (inductor), aot_autograd
        }
        compile_s = None if self.compile_s is None else round(self.compile_s, 3)
        return {"fast_path": d.describe(), "compile_s": compile_s, "compile_cache": cache}

    # -- warm-up

    def precompile(
        self,
        model: torch.nn.Module,
        device: torch.device,
        vocab: int,
        regression: bool,
        train_rows: int,
        backward: Callable[[torch.Tensor], None],
        zero_grad: Callable[[], None],
        repeats: int = 3,
        between: Callable[[], None] = lambda: None,
    ) -> float:
        """Compile (and record CUDA graphs for) every bucket shape before training; returns the seconds spent.

        The dummy batches carry weight 0, so the gradients are exactly zero and are dropped; the optimizer is
        not stepped, so the training itself is unchanged (dropout draws random numbers, though). ``between`` runs
        after each shape (a compile cannot be interrupted; the stop check runs between them).
        """
        if not self.compiled:
            return 0.0
        t0 = time.perf_counter()
        was_training = model.training
        for length in self.decision.buckets or ():
            model.train()
            for _ in range(repeats):  # CUDA graph trees warm up eagerly once, then record, then replay
                b = dummy_batch(self.inputs, train_rows, length, vocab, regression, device)
                losses = self.train_losses(b)
                backward((losses * b["weight"]).sum())
                zero_grad()
            model.eval()
            with torch.no_grad():
                for _ in range(repeats):
                    batch = dummy_batch(self.inputs, self.eval_rows, length, vocab, regression, device)
                    self.eval_logits(batch)
            between()
        model.train(was_training)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.warm = True
        self.warmup_s = time.perf_counter() - t0
        log.info(
            "fast path: %d shapes ready in %.1f s (%d graphs compiled)",
            2 * len(self.decision.buckets or ()),
            self.warmup_s,
            self.graph_count(),
        )
        return self.warmup_s


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    extra = rows - t.shape[0]
    return torch.cat([t, t[:1].expand(extra, *t.shape[1:])], 0)


def dummy_batch(
    inputs: Inputs, rows: int, length: int, vocab: int, regression: bool, device: torch.device
) -> dict:
    """A weight-0 batch with the model's real input fields (random token ids, other fields at 0)."""
    g = torch.Generator().manual_seed(length)
    batch = {
        name: torch.randint(1, max(2, vocab), (rows, length), generator=g)
        if name == "input_ids"
        else torch.zeros(rows, length, dtype=torch.long)
        for name in inputs.fields
    }
    batch.update(
        attention_mask=torch.ones(rows, length, dtype=torch.long),
        labels=torch.zeros(rows, dtype=torch.float if regression else torch.long),
        weight=torch.zeros(rows),
    )
    return {k: v.to(device) for k, v in batch.items()}


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (a process-wide counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def build(
    cfg: Config,
    decision: Decision,
    forward: Callable[[dict], torch.Tensor],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    accum: int,
    inputs: Inputs | None = None,
    eval_rows: int | None = None,
) -> FastPath:
    log.info(decision.describe())
    rows = eval_rows or cfg.eval.batch_size
    return FastPath(decision, forward, loss, eval_rows=rows, accum=accum, inputs=inputs or Inputs())


def eval_rows_per_forward(batch_size: int, split_rows: Iterable[int]) -> int:
    """Rows of one compiled eval forward: ``eval.batch_size``, or the largest evaluated split's rows when that is
    smaller (no rank's batch can hold more; padding to a size asked for would cost memory for nothing)."""
    return max(1, min(batch_size, max(split_rows, default=1)))


def attach(
    decision: Decision,
    *,
    cfg: Config,
    acc: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    forward: Callable[[dict], torch.Tensor],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: Inputs,
    layout: Layout,
    regression: bool,
    vocab: int,
    train_rows: int,
    eval_rows: int | None = None,
    between_shapes: Callable[[], None] = lambda: None,
) -> FastPath:
    """The loop's step functions (``forward``: batch -> logits, ``loss``: per-sample losses), compiled and warmed
    up on the fast path; plain wrappers of the same functions otherwise. ``between_shapes`` runs after each
    shape's compile (collective: every rank compiles the same shapes in the same order)."""
    fast = build(cfg, decision, forward, loss, layout.accum, inputs, eval_rows)
    if not fast.set_to_none:
        preallocate_grads(model)
    if fast.compiled and cfg.fast.precompile:
        before = cache_counters()
        fast.compile_s = fast.precompile(
            model,
            acc.device,
            vocab,
            regression,
            layout.rows_per_forward(train_rows),  # the rows of every training forward (the sampler's)
            acc.backward,
            lambda: optimizer.zero_grad(set_to_none=fast.set_to_none),
            between=between_shapes,
        )
        fast.cache_lookups = lookups_since(before)
        if decision.cache and acc.is_main_process:
            decision.cache.save(fast.compile_s, fast.cache_lookups, decision.shapes)
        _log_compile(fast)
    return fast


def _log_compile(fast: FastPath) -> None:
    info = fast.run_info()["compile_cache"]
    log.info(
        "fast path: %.1f s compiling before the first step; compile cache %s: %s hits, %s misses (%s before)",
        fast.compile_s or 0.0,
        info["dir"],
        info["hits"],
        info["misses"],
        "warm" if info["warm_before"] else "cold",
    )


def preallocate_grads(model: torch.nn.Module) -> None:
    """Give every trainable parameter a zero ``.grad`` (kept across steps: see ``FastPath.set_to_none``)."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
