"""What each run reports about its own speed: tokens/s, where a step's time goes, MFU, and an
optional torch.profiler trace.

MFU = achieved model FLOP/s / peak FLOP/s of the devices: FLOPs per token from
pretrain.models.flops (the one implementation), times tokens/s, over `world_size x peak`. The
peak is `run.peak_flops` when set, else this table's dense figure for the detected GPU and the
run's precision, else (CPU) an estimate: threads x clock x FP32 FLOP per cycle from the core's
vector extensions (64 with AVX-512, 32 with AVX2 and FMA: two FMA pipes).

The step split (PerfHook) times, on the host: waiting for the loader (`time_data_s`), the
optimizer step (`time_optimizer_s`, DeepSpeed's `engine.step`), the gradient all-reduce where
DeepSpeed runs one of its own (`time_comm_s`, ZeRO 0-1), and forward+backward as the rest of
the step (`time_fwd_bwd_s`). On CPU the host is the device and these are exact; on CUDA they
are launch times unless the step synchronises (a later step waits for earlier kernels).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

# Dense peak FLOP/s per device (tensor cores, no sparsity) by precision, from the vendors'
# data sheets; matched against torch.cuda.get_device_name, first match wins.
GPU_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989e12, "fp32": 67e12}),
    ("H100", {"bf16": 989e12, "fp32": 67e12}),  # SXM; PCIe is lower, set run.peak_flops
    ("A100", {"bf16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp32": 91.6e12}),
    ("A10", {"bf16": 125e12, "fp32": 31.2e12}),
    ("V100", {"bf16": 125e12, "fp32": 15.7e12}),  # fp16 tensor cores; no bf16
]


def cpu_flop_per_cycle(cpuinfo: str) -> int:
    """FP32 FLOP per cycle of one x86 core from its vector extensions: two FMA pipes of 16
    lanes (AVX-512), or of 8 (AVX2 with FMA), 2 FLOP each; else SSE's 4 lanes, a multiply and
    an add. (Some AVX-512 parts have one FMA pipe: set run.peak_flops for those.)"""
    flags = (
        set(re.findall(r"^flags\s*:(.*)$", cpuinfo, re.M)[0].split())
        if "flags" in cpuinfo
        else set()
    )
    if "avx512f" in flags:
        return 64
    if {"avx2", "fma"} <= flags:
        return 32
    return 8


def cpu_clock_and_flop_per_cycle() -> tuple[float, int] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    match = re.search(r"cpu MHz\s*:\s*([\d.]+)", text)
    return (float(match.group(1)) * 1e6, cpu_flop_per_cycle(text)) if match else None


def device_peak_flops(
    device_type: str, precision: str, device_name: str = "", threads: int = 1
) -> tuple[float | None, str]:
    """(peak FLOP/s of one device or None, where the figure comes from)."""
    if device_type == "cuda":
        for key, peaks in GPU_PEAKS:
            if key in device_name:
                return peaks.get(precision), f"table: {key} {precision}"
        return None, f"no table entry for {device_name!r}; set run.peak_flops"
    known = cpu_clock_and_flop_per_cycle()
    if known is None:
        return None, "CPU clock unknown; set run.peak_flops"
    clock, per_cycle = known
    return threads * clock * per_cycle, (
        f"estimate: {threads} thread(s) x {clock / 1e9:.2f} GHz x {per_cycle} FLOP/cycle"
    )


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float, devices: int) -> float:
    """Model FLOPs utilisation: the share of `devices x peak_flops` that the model's own
    FLOPs (not recomputation's) at `tokens_per_s` over all devices make up."""
    return flops_per_token * tokens_per_s / (peak_flops * devices)


def run_peak(cfg: Any, layout: Any) -> tuple[float | None, str]:
    """This run's peak per device: run.peak_flops, or device_peak_flops."""
    if cfg.run.peak_flops:
        return float(cfg.run.peak_flops), "run.peak_flops"
    import torch

    name = torch.cuda.get_device_name(layout.device) if layout.device.type == "cuda" else ""
    return device_peak_flops(layout.device.type, cfg.run.precision, name, torch.get_num_threads())


class Stopwatch:
    """Seconds spent inside the wrapped callables since the last `take()`."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s


class PerfHook:
    """Per log interval: the step split, tokens/s, model TFLOP/s and MFU, into the step's
    metrics (so the console line and MLflow get them); runs the profiler window if asked.

    Goes after ProgressHook, whose interval `step_time` and `tokens_per_s` it reuses (one clock
    for both lines). The split is averaged per step over the interval's train steps (eval and
    saves excluded: the time inside Trainer.train_step)."""

    def __init__(self, trainer: Any, flops_per_token: float, printer=print):
        self.print = printer
        self.fpt = flops_per_token
        self.peak, self.peak_source = run_peak(trainer.cfg, trainer.layout)
        self.devices = trainer.layout.world_size
        self.data, self.opt, self.comm = Stopwatch(), Stopwatch(), Stopwatch()
        self.step = Stopwatch()
        # Instance attributes shadow the methods: the loop, runner and loader call these.
        loader, engine = trainer.train_data, trainer.engine
        trainer.train_step = self.step.wrap(trainer.train_step)
        loader.next_step = self.data.wrap(loader.next_step)
        if hasattr(engine, "allreduce_gradients"):
            engine.allreduce_gradients = self.comm.wrap(engine.allreduce_gradients)
        self.sums = {"data": 0.0, "optimizer": 0.0, "comm": 0.0, "step": 0.0}
        self.steps = 0
        self.warm = False  # the launch's first step (warm-up) is left out, as ProgressHook does
        a_b = trainer.cfg.run.profile_steps
        self.window = (a_b[0], a_b[1]) if a_b else None
        self.trace_dir = trainer.cfg.run.run_dir / "profile"
        self.profiler: Any = None
        if self.window and self.window[0] == trainer.state.step + 1:
            self._start_profiler()

    def _start_profiler(self) -> None:
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
        self.profiler.__enter__()

    def _stop_profiler(self, trainer: Any) -> None:
        self.profiler.__exit__(None, None, None)
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        path = self.trace_dir / f"trace_rank{trainer.layout.rank}.json"
        self.profiler.export_chrome_trace(str(path))
        self.profiler = None
        self.print(f"profiler: steps {self.window[0]}-{self.window[1]} traced to {path}")

    def after_step(self, trainer: Any, metrics: dict[str, Any]) -> None:
        step = trainer.state.step
        timed = {"step": self.step, "data": self.data, "optimizer": self.opt, "comm": self.comm}
        for key, watch in timed.items():
            seconds = watch.take()
            if self.warm:
                self.sums[key] += seconds
        self.steps += int(self.warm)
        if not self.warm:
            # Wrapped only now: the first-step memory probe (pretrain.memory) wraps engine.step
            # for step 1 and then deletes the instance attribute, which would drop ours.
            trainer.engine.step = self.opt.wrap(trainer.engine.step)
            self.warm = True
        if self.window and step == self.window[1] and self.profiler is not None:
            self._stop_profiler(trainer)
        if self.window and step + 1 == self.window[0]:
            self._start_profiler()
        if "tokens_per_s" in metrics:  # a log step (ProgressHook measured the interval)
            n = max(self.steps, 1)
            split = {k: v / n for k, v in self.sums.items()}
            metrics["time_data_s"] = split["data"]
            metrics["time_optimizer_s"] = split["optimizer"]
            metrics["time_comm_s"] = split["comm"]
            metrics["time_fwd_bwd_s"] = max(
                split["step"] - split["data"] - split["optimizer"] - split["comm"], 0.0
            )
            achieved = self.fpt * metrics["tokens_per_s"]
            metrics["model_tflops"] = achieved / 1e12
            if self.peak:
                metrics["mfu"] = mfu(self.fpt, metrics["tokens_per_s"], self.peak, self.devices)
            from pretrain.memory import peaks_over_ranks, peaks_text

            # Every rank is here on a log step (ProgressHook measured it on each): one gather.
            peaks = peaks_over_ranks(trainer.layout)
            metrics.update(peaks)
            if trainer.layout.is_main:
                mfu_text = f"MFU {metrics['mfu']:.1%}" if "mfu" in metrics else "MFU n/a"
                self.print(
                    f"step {step:>6} | perf: data {split['data'] * 1e3:.1f} ms, fwd+bwd "
                    f"{metrics['time_fwd_bwd_s'] * 1e3:.1f} ms, optimizer "
                    f"{split['optimizer'] * 1e3:.1f} ms, comm {split['comm'] * 1e3:.1f} ms | "
                    f"{achieved / 1e9:,.2f} GFLOP/s | {mfu_text} | {peaks_text(peaks)}",
                    flush=True,
                )
            self.sums = dict.fromkeys(self.sums, 0.0)
            self.steps = 0

    def at_end(self, trainer: Any) -> None:
        if self.profiler is not None:
            self._stop_profiler(trainer)


def peak_line(hook: PerfHook) -> str:
    peak = f"{hook.peak / 1e12:,.3g} TFLOP/s per device" if hook.peak else "unknown"
    return f"MFU peak: {peak} ({hook.peak_source})"
