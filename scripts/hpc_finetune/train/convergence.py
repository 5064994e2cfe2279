"""The convergence check of the train stage: what the trainer's log history says about the run. Non-finite losses
or gradient norms, no improvement at all, divergence, a plateau, overfitting (the best evaluation named), gradient
norm spikes, and a learning rate that did not follow the configured schedule. Each check says ok, warning, failed
or skipped (too few values) with the steps and values it saw; the verdict is the worst of them. A resumed run's
history holds the earlier sessions' steps, so the check always sees the whole run. The thresholds are the keys of
`training.convergence` (workflow/schemas/config.schema.yaml). No heavy imports at module level.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass

from hpc_finetune.io.cli import StageError, log
from hpc_finetune.io.cli import plural as n
from hpc_finetune.io.schema import option

ORDER = {"ok": 0, "skipped": 0, "warning": 1, "failed": 2}
FIX = "lower training.learning_rate (e.g. by 10x) or add warmup (training.warmup_ratio)"


@dataclass(frozen=True)
class Settings:
    fail_stage: bool = option("training.convergence.fail_stage")
    window: int = option("training.convergence.window")
    tolerance: float = option("training.convergence.tolerance")
    divergence_ratio: float = option("training.convergence.divergence_ratio")
    plateau_fraction: float = option("training.convergence.plateau_fraction")
    overfit_patience: int = option("training.convergence.overfit_patience")
    grad_spike_factor: float = option("training.convergence.grad_spike_factor")
    lr_tolerance: float = option("training.convergence.lr_tolerance")

    @classmethod
    def of(cls, values: dict | None) -> Settings:
        """From the `training.convergence` mapping; missing keys take the schema's defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values or {}) - names)
        if unknown:
            raise StageError(f"training.convergence: unknown keys {unknown}; known: {sorted(names)}")
        return cls(**(values or {}))


@dataclass(frozen=True)
class Schedule:
    """The learning-rate schedule as configured: peak rate, kind, warmup and total optimizer steps."""

    peak: float
    kind: str
    warmup_steps: int
    total_steps: int

    def rate(self, step: int) -> float:
        """transformers' schedules (optimization.py), with warmup for every kind: `constant` ignores the warmup
        there, and the check reports that as a warmup that never happened."""
        warmup, total = self.warmup_steps, self.total_steps
        if step < warmup:
            return self.peak * step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if self.kind == "linear":
            return self.peak * max(0.0, (total - step) / max(1, total - warmup))
        if self.kind == "cosine":
            return self.peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return self.peak  # constant, constant_with_warmup


@dataclass
class Check:
    status: str
    detail: str

    def as_dict(self) -> dict:
        return {"status": self.status, "detail": self.detail}


def series(history: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of every entry that has `key`; the final `train_loss` summary entry has no `loss`."""
    return [(int(entry.get("step", 0)), float(entry[key])) for entry in history
            if isinstance(entry.get(key), (int, float))]


def g(value: float) -> str:
    return f"{value:.4g}"


# --- the checks -------------------------------------------------------------------------------------------------


NON_FINITE_KEYS = (("loss", "train loss"), ("grad_norm", "gradient norm"), ("eval_loss", "eval loss"))


def non_finite(history: list[dict]) -> Check:
    bad = sorted((step, order, name, value) for order, (key, name) in enumerate(NON_FINITE_KEYS)
                 for step, value in series(history, key) if not math.isfinite(value))
    if bad:
        step, _, name, value = bad[0]
        count = n(len(bad), "non-finite value")
        return Check("failed", f"{name} is {value} at step {step} ({count}): the weights are broken; {FIX}")
    return Check("ok", "every loss and gradient norm is finite")


def broken(history: list[dict]) -> bool:
    """Whether the last train entry has a non-finite loss or gradient norm (the run stopped there)."""
    last = next((entry for entry in reversed(history) if "loss" in entry or "grad_norm" in entry), {})
    return any(isinstance(last.get(k), float) and not math.isfinite(last[k]) for k in ("loss", "grad_norm"))


def improvement(losses: list[tuple[int, float]], s: Settings) -> Check:
    if len(losses) < 2:
        return Check("skipped", f"{n(len(losses), 'logged train loss')}; needs 2 (lower training.logging_steps)")
    (step0, first), rest = losses[0], losses[1:]
    best_step, best = min(rest, key=lambda p: p[1])
    if best > first * (1 - s.tolerance):
        rose = losses[-1][1] > first * (1 + s.tolerance)
        fix = FIX if rose else ("raise training.learning_rate, or check the data and training.target_modules (a "
                                "flat loss)")
        return Check("failed", f"train loss never improved on its first value {g(first)} (step {step0}) by more "
                               f"than {s.tolerance:.0%}: best {g(best)} at step {best_step}; nothing was learned; {fix}")
    return Check("ok", f"train loss {g(first)} (step {step0}) -> best {g(best)} (step {best_step})")


def divergence(losses: list[tuple[int, float]], s: Settings) -> Check:
    if len(losses) < s.window + 1:
        return Check("skipped", f"{n(len(losses), 'logged train loss')}; needs {s.window + 1}")
    head, tail = losses[:-s.window], losses[-s.window:]
    best_step, best = min(head, key=lambda p: p[1])
    limit = best * (1 + s.divergence_ratio)
    if all(value > limit for _, value in tail):
        last_step, last = tail[-1]
        first = losses[0][1]
        worse = last >= first
        return Check("failed" if worse else "warning",
                     f"train loss diverged: the last {s.window} logged values (steps {tail[0][0]}-{last_step}) are "
                     f"all more than {s.divergence_ratio:.0%} above the best {g(best)} (step {best_step}), ending at "
                     f"{g(last)}" + (f", at or above the first {g(first)}: the adapter is no better than none; "
                                     f"{FIX}" if worse else f"; {FIX}"))
    return Check("ok", f"no sustained rise: best {g(best)} (step {best_step}), last {g(tail[-1][1])}")


def plateau(losses: list[tuple[int, float]], s: Settings) -> Check:
    last_step = losses[-1][0] if losses else 0
    start = next((i for i, (step, _) in enumerate(losses) if step >= last_step * (1 - s.plateau_fraction)), 0)
    if start < s.window - 1 or len(losses) - start < s.window:
        return Check("skipped", f"{n(len(losses), 'logged train loss')}; needs {s.window} before and {s.window} in the "
                                f"last {s.plateau_fraction:.0%} of the steps")
    before = statistics.fmean(v for _, v in losses[start - s.window + 1:start + 1])
    after = statistics.fmean(v for _, v in losses[-s.window:])
    span = f"steps {losses[start][0]}-{last_step}"
    if after > before * (1 - s.tolerance):
        return Check("warning", f"train loss plateaued: over the last {s.plateau_fraction:.0%} of the run ({span}) "
                                f"its mean over {s.window} logged values went {g(before)} -> {g(after)}, less than "
                                f"{s.tolerance:.0%} better; the last steps learned nothing (raise "
                                "training.learning_rate, or train fewer steps)")
    return Check("ok", f"still improving in the last {s.plateau_fraction:.0%} ({span}): {g(before)} -> {g(after)}")


def overfitting(history: list[dict], losses: list[tuple[int, float]], s: Settings,
                best_kept: bool) -> tuple[Check, int | None]:
    evals = series(history, "eval_loss")
    if not evals:
        return Check("skipped", "no evaluations (no eval data)"), None
    best_index = min(range(len(evals)), key=lambda i: (evals[i][1], i))
    best_step, best = evals[best_index]
    after = evals[best_index + 1:]
    if len(after) < s.overfit_patience:
        return Check("ok", f"best eval loss {g(best)} at step {best_step}, {n(len(after), 'evaluation')} after it"), best_step
    last_step, last = after[-1]
    # The train loss when the eval loss was best: the last one logged by then, or the first after (best at step 0).
    upto = [v for step, v in losses if step <= best_step]
    later = [v for step, v in losses if step > best_step]
    then = upto[-1] if upto else (later[0] if later else None)
    train_fell = then is not None and bool(later) and later[-1] < then
    if last > best * (1 + s.tolerance) and train_fell and best_kept:
        return Check("ok", f"eval loss rose after its best {g(best)} at step {best_step} (to {g(last)} at step "
                           f"{last_step}); early stopping kept the adapter of step {best_step}"), best_step
    if last > best * (1 + s.tolerance) and train_fell:
        return Check("warning", f"overfitting: eval loss rose for {len(after)} evaluations after its best {g(best)} "
                                f"at step {best_step} (to {g(last)} at step {last_step}) while train loss fell "
                                f"{g(then)} -> {g(later[-1])}; the best adapter is step {best_step} "
                                "(set training.early_stopping_patience, or train fewer epochs)"), best_step
    return Check("ok", f"best eval loss {g(best)} at step {best_step}; last {g(last)} at step {last_step}"), best_step


def grad_spikes(history: list[dict], s: Settings) -> Check:
    norms = series(history, "grad_norm")
    if len(norms) <= s.window:
        return Check("skipped", f"{n(len(norms), 'logged gradient norm')}; needs {s.window + 1}")
    spikes = []
    for i in range(s.window, len(norms)):
        median = statistics.median(v for _, v in norms[i - s.window:i])
        step, value = norms[i]
        if math.isfinite(value) and value > s.grad_spike_factor * median:
            spikes.append(f"{g(value)} at step {step} (median of the {s.window} before: {g(median)})")
    if spikes:
        more = f" and {len(spikes) - 3} more" if len(spikes) > 3 else ""
        return Check("warning", f"gradient norm spiked above {g(s.grad_spike_factor)}x its recent median "
                                f"{n(len(spikes), 'time')}: {'; '.join(spikes[:3])}{more}; {FIX}")
    return Check("ok", f"no gradient norm above {g(s.grad_spike_factor)}x the median of the {s.window} before it")


def learning_rate(history: list[dict], schedule: Schedule, s: Settings) -> Check:
    rates = series(history, "learning_rate")
    if not rates:
        return Check("skipped", "no learning rate logged")
    allowed = s.lr_tolerance * schedule.peak
    # The rate logged at step n is the one its update used: schedule(n - 1) in transformers 5, schedule(n) before.
    wrong = [(step, value, schedule.rate(step - 1)) for step, value in rates
             if min(abs(value - schedule.rate(step - 1)), abs(value - schedule.rate(step))) > allowed]
    if not wrong:
        return Check("ok", f"follows the {schedule.kind} schedule (peak {g(schedule.peak)}, {schedule.warmup_steps} "
                           f"warmup of {n(schedule.total_steps, 'step')}) at {n(len(rates), 'logged step')}")
    step, value, expected = wrong[0]
    if step <= schedule.warmup_steps:
        what = f"never warmed up as configured ({schedule.warmup_steps} warmup steps" + (
            "; lr_scheduler constant ignores warmup, use constant_with_warmup)" if schedule.kind == "constant" else ")")
    elif expected < value:
        what = f"did not decay as the {schedule.kind} schedule says"
    else:
        what = f"is below the {schedule.kind} schedule"
    return Check("warning", f"learning rate {what}: {g(value)} at step {step}, expected {g(expected)} "
                            f"({len(wrong)} of {n(len(rates), 'logged step')} off by more than {s.lr_tolerance:.0%} of "
                            "the peak)")


# --- the verdict -------------------------------------------------------------------------------------------------


def check(history: list[dict], schedule: Schedule, settings: Settings, best_kept: bool = False) -> dict:
    """The verdict (ok / warning / failed), the reasons (failed first), the best evaluation's step and loss, and
    every check's status and detail. best_kept: the best evaluation's adapter is the one saved (early stopping
    with load_best_model_at_end), so a later rise of the eval loss is no overfitting of the result."""
    finite = [(step, value) for step, value in series(history, "loss") if math.isfinite(value)]
    over, best_step = overfitting(history, finite, settings, best_kept)
    checks = {
        "non_finite": non_finite(history),
        "improvement": improvement(finite, settings),
        "divergence": divergence(finite, settings),
        "plateau": plateau(finite, settings),
        "overfitting": over,
        "grad_norm_spikes": grad_spikes(history, settings),
        "learning_rate": learning_rate(history, schedule, settings),
    }
    if checks["divergence"].status in ("warning", "failed"):  # a rising loss is not also a plateau
        checks["plateau"] = Check("skipped", "the train loss diverged")
    verdict = max((c.status for c in checks.values()), key=ORDER.__getitem__)
    reasons = [c.detail for status in ("failed", "warning") for c in checks.values() if c.status == status]
    evals = dict(series(history, "eval_loss"))
    return {
        "verdict": verdict if verdict != "skipped" else "ok",
        "reasons": reasons,
        "best_step": best_step,
        "best_eval_loss": evals.get(best_step) if best_step is not None else None,
        "checks": {name: c.as_dict() for name, c in checks.items()},
        "settings": dataclasses.asdict(settings),
    }


def summary_line(result: dict) -> str:
    """One line for a table: the verdict and its first reason."""
    reasons = result["reasons"]
    more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
    return result["verdict"] + (f": {reasons[0]}{more}" if reasons else "")


def stop_on_non_finite():
    """A callback that stops training at the first non-finite train loss or gradient norm, keeping no checkpoint of
    that step: the weights (and AdamW's moments) are NaN from there on, every further step is wasted, and a
    re-run resumes from the last good checkpoint."""
    from transformers import TrainerCallback

    class StopOnNonFinite(TrainerCallback):
        step: int | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            values = [logs[k] for k in ("loss", "grad_norm") if isinstance((logs or {}).get(k), (int, float))]
            if self.step is None and any(not math.isfinite(v) for v in values):
                self.step = state.global_step
                control.should_training_stop = True
                control.should_save = control.should_evaluate = False
                if state.is_world_process_zero:
                    log.error("non-finite train loss or gradient norm at step %d: stopping training", self.step)

    return StopOnNonFinite()

