"""The convergence check on synthetic training histories shaped as the trainer logs them: every check firing and
not firing, thresholds at their edges, the verdict and its reasons; its schedules against transformers' own."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hpc_finetune.io.cli import StageError
from hpc_finetune.io.schema import default
from hpc_finetune.train.convergence import Schedule, Settings, broken, check, stop_on_non_finite

S = Settings()  # the schema's defaults: window 5, tolerance 0.01, divergence 0.5, plateau 0.25, patience 3, x10
TOTAL = 100


def linear(step: int) -> float:
    return Schedule(1e-3, "linear", 0, TOTAL).rate(step)


def history(losses: list[float], *, evals: dict[int, float] | None = None, grads: list[float] | None = None,
            rate=linear, every: int = 1) -> list[dict]:
    """Train entries at steps every, 2*every, ... (loss, grad_norm, learning_rate as used by the step's update),
    eval entries at their steps, the trainer's closing summary entry last."""
    entries = []
    for i, loss in enumerate(losses):
        step = (i + 1) * every
        entries.append({"loss": loss, "grad_norm": (grads or [1.0] * len(losses))[i],
                        "learning_rate": rate(step - 1), "epoch": step / 10, "step": step})
    for step, value in (evals or {}).items():
        entries.append({"eval_loss": value, "eval_runtime": 0.1, "epoch": step / 10, "step": step})
    entries.sort(key=lambda e: (e["step"], "eval_loss" in e))
    entries.append({"train_runtime": 1.0, "train_loss": 1.0, "step": len(losses) * every})
    return entries


def decaying(n: int = 20, start: float = 4.0, rate: float = 0.8) -> list[float]:
    return [start * rate**i for i in range(n)]


def run(entries: list[dict], settings: Settings = S, schedule: Schedule | None = None) -> dict:
    return check(entries, schedule or Schedule(1e-3, "linear", 0, TOTAL), settings)


def status(result: dict, name: str) -> str:
    return result["checks"][name]["status"]


def detail(result: dict, name: str) -> str:
    return result["checks"][name]["detail"]


# --- a healthy run ---------------------------------------------------------------------------------------------


def test_a_healthy_run_is_ok_with_its_best_evaluation_named():
    result = run(history(decaying(), evals={0: 5.0, 10: 2.0, 20: 1.0}))
    assert result["verdict"] == "ok" and result["reasons"] == [], result
    assert result["best_step"] == 20 and result["best_eval_loss"] == 1.0
    assert {c["status"] for c in result["checks"].values()} == {"ok"}, result["checks"]
    assert "step 1" in detail(result, "improvement") and result["settings"] == dataclasses.asdict(S)


def test_without_eval_data_overfitting_is_skipped_and_no_best_step():
    result = run(history(decaying()))
    assert result["verdict"] == "ok" and result["best_step"] is None
    assert status(result, "overfitting") == "skipped"


def test_too_short_a_history_skips_what_it_cannot_judge_and_is_ok():
    result = run(history([3.0]))
    assert result["verdict"] == "ok"
    for name in ("improvement", "divergence", "plateau", "grad_norm_spikes"):
        assert status(result, name) == "skipped", name
    assert "logging_steps" in detail(result, "improvement")


# --- non-finite values -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("where", "value", "named"), [
    ("loss", math.nan, "train loss is nan at step 7"),
    ("loss", math.inf, "train loss is inf at step 7"),
    ("grad_norm", math.inf, "gradient norm is inf at step 7"),
    ("eval_loss", math.nan, "eval loss is nan at step 10"),
])
def test_a_non_finite_value_fails_the_run_naming_the_step_and_the_fix(where, value, named):
    entries = history(decaying(), evals={10: 2.0, 20: 1.0})
    target = next(e for e in entries if where in e and e["step"] == (10 if where == "eval_loss" else 7))
    target[where] = value
    result = run(entries)
    assert result["verdict"] == "failed" and status(result, "non_finite") == "failed"
    assert named in result["reasons"][0] and "training.learning_rate" in result["reasons"][0]
    assert "(1 non-finite value)" in result["reasons"][0]


def test_the_first_non_finite_value_is_named_whichever_it_is():
    entries = history(decaying(), evals={10: 2.0, 20: 1.0})
    for entry in entries:
        if entry["step"] >= 9 and "grad_norm" in entry:
            entry["grad_norm"] = math.nan
        for key in ("loss", "eval_loss"):
            if entry["step"] >= 10 and key in entry:
                entry[key] = math.nan
    reason = run(entries)["reasons"][0]  # 12 gradient norms, 11 train losses, 2 eval losses
    assert reason.startswith("gradient norm is nan at step 9 (25 non-finite values)"), reason


@pytest.mark.parametrize(("last", "expected"), [
    ({"loss": 2.0, "grad_norm": math.nan}, True), ({"loss": math.inf, "grad_norm": 1.0}, True),
    ({"loss": 2.0, "grad_norm": 1.0}, False),
])
def test_broken_reads_the_last_train_entry(last, expected):
    entries = [{"loss": math.nan, "grad_norm": math.nan, "step": 1}, {**last, "step": 2},
               {"eval_loss": 2.0, "step": 2}, {"train_runtime": 1.0, "step": 2}]
    assert broken(entries) is expected


# --- no improvement ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("last", "fix"), [(4.0, "raise training.learning_rate"), (4.5, "lower training.learning_rate")])
def test_no_improvement_at_all_fails_with_the_fix_of_a_flat_or_a_rising_loss(last, fix):
    result = run(history([4.0, 4.1, 3.99, 4.2, 4.05, last]))
    assert result["verdict"] == "failed" and status(result, "improvement") == "failed"
    assert "never improved on its first value 4 (step 1)" in result["reasons"][0] and fix in result["reasons"][0]


@pytest.mark.parametrize(("best", "expected"), [(1.0, "ok"), (1.0000001, "failed")])
def test_no_improvement_edge_is_exactly_the_tolerance(best, expected):
    settings = dataclasses.replace(S, tolerance=0.5)  # best must be at most half the first: 2.0 -> 1.0
    result = run(history([2.0, 1.5, best, 1.2]), settings)
    assert status(result, "improvement") == expected


# --- divergence ---------------------------------------------------------------------------------------------------


def test_a_rise_above_the_best_for_a_window_warns_and_names_the_best_step():
    losses = [4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 2.2, 2.5, 2.6, 3.0]  # best 1.0 (step 4), then 5 values above 1.5
    result = run(history(losses))
    assert status(result, "divergence") == "warning" and result["verdict"] == "warning"
    assert "best 1 (step 4)" in detail(result, "divergence") and "steps 6-10" in detail(result, "divergence")
    assert status(result, "plateau") == "skipped"  # a rising loss is not also reported as a plateau


def test_a_divergence_that_ends_at_or_above_the_first_loss_fails():
    losses = [4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 3.5, 3.9, 4.0]
    result = run(history(losses))
    assert status(result, "divergence") == "failed" and result["verdict"] == "failed"
    assert "no better than none" in result["reasons"][0]


@pytest.mark.parametrize(("tail", "expected"), [
    ([1.5] * 5, "ok"),  # exactly 50% above the best is not a divergence
    ([1.6, 1.6, 1.4, 1.6, 1.6], "ok"),  # one value back near the best: noise, not a sustained rise
    ([1.51] * 5, "warning"),
])
def test_divergence_edges(tail, expected):
    result = run(history([4.0, 3.0, 2.0, 1.0, *tail]))
    assert status(result, "divergence") == expected


# --- plateau ----------------------------------------------------------------------------------------------------


def test_a_flat_last_quarter_is_a_plateau():
    losses = [*decaying(12), *[0.5] * 8]  # steps 13-20 flat at 0.5
    result = run(history(losses))
    assert status(result, "plateau") == "warning" and result["verdict"] == "warning"
    assert "plateaued" in result["reasons"][0] and "steps 15-20" in result["reasons"][0]


@pytest.mark.parametrize(("factor", "expected"), [(0.99, "ok"), (0.991, "warning")])
def test_plateau_edge_is_the_tolerance(factor, expected):
    """The mean of the last 5 against the mean of the 5 ending where the last quarter starts (step 15 of 20)."""
    losses = [2.0] * 15 + [2.0 * factor] * 5
    assert status(run(history(losses)), "plateau") == expected


def test_a_still_falling_loss_is_no_plateau_even_when_small():
    result = run(history(decaying(40, start=4.0, rate=0.85)))  # 4.0 -> 0.007: converging, not stuck
    assert status(result, "plateau") == "ok"


# --- overfitting -----------------------------------------------------------------------------------------------


def test_eval_loss_rising_while_train_loss_falls_is_overfitting_with_the_best_step():
    evals = {0: 5.0, 4: 2.0, 8: 1.2, 12: 1.4, 16: 1.6, 20: 1.8}
    result = run(history(decaying(), evals=evals))
    assert status(result, "overfitting") == "warning" and result["verdict"] == "warning"
    assert result["best_step"] == 8 and result["best_eval_loss"] == 1.2
    reason = result["reasons"][0]
    assert "best 1.2 at step 8" in reason and "to 1.8 at step 20" in reason and "3 evaluations" in reason


def test_with_early_stopping_keeping_the_best_adapter_a_later_rise_is_ok():
    evals = {0: 5.0, 4: 2.0, 8: 1.2, 12: 1.4, 16: 1.6, 20: 1.8}
    result = check(history(decaying(), evals=evals), Schedule(1e-3, "linear", 0, TOTAL), S, best_kept=True)
    assert status(result, "overfitting") == "ok" and result["best_step"] == 8
    assert "early stopping kept the adapter of step 8" in detail(result, "overfitting")


@pytest.mark.parametrize(("evals", "expected"), [
    ({0: 5.0, 8: 1.2, 12: 1.4, 16: 1.6}, "ok"),  # only 2 evaluations after the best: patience is 3
    ({0: 5.0, 8: 1.2, 12: 1.21, 16: 1.21, 20: 1.212}, "ok"),  # within 1% of the best: noise
    ({0: 5.0, 8: 1.2, 12: 1.21, 16: 1.21, 20: 1.2121}, "warning"),  # just above 1%
    ({0: 5.0, 8: 1.2, 12: 1.3, 16: 1.2, 20: 1.4}, "warning"),  # the best is not improved on again
])
def test_overfitting_edges(evals, expected):
    assert status(run(history(decaying(), evals=evals)), "overfitting") == expected


def test_eval_and_train_loss_rising_together_is_not_overfitting():
    losses = [4.0, 3.0, 2.0, 1.0, 1.1, 1.2, 1.3, 1.4, 1.45, 1.45]  # rising, but less than divergence needs
    result = run(history(losses, evals={0: 5.0, 4: 1.0, 6: 1.2, 8: 1.4, 10: 1.5}))
    assert status(result, "overfitting") == "ok" and result["best_step"] == 4


def test_an_eval_loss_that_never_beats_its_start_overfits_from_the_start():
    result = run(history(decaying(), evals={0: 2.0, 5: 2.1, 10: 2.3, 15: 2.4, 20: 2.6}))
    assert status(result, "overfitting") == "warning" and result["best_step"] == 0


# --- gradient-norm spikes -------------------------------------------------------------------------------------


def test_a_gradient_norm_spike_warns_naming_step_value_and_median():
    grads = [5.0, 3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 12.0, 1.0]
    result = run(history(decaying(10), grads=grads))
    assert status(result, "grad_norm_spikes") == "warning"
    assert "12 at step 9 (median of the 5 before: 1)" in result["reasons"][0]


@pytest.mark.parametrize(("spike", "expected"), [(10.0, "ok"), (10.01, "warning")])
def test_gradient_spike_edge_is_the_factor(spike, expected):
    grads = [1.0] * 8 + [spike, 1.0]
    assert status(run(history(decaying(10), grads=grads)), "grad_norm_spikes") == expected


def test_large_first_gradient_norms_are_no_spike():
    """Untrained weights give large norms; a spike needs `window` values before it to compare with."""
    grads = [80.0, 40.0, 10.0, 3.0, 2.0, 1.5, 1.2, 1.1, 1.0, 1.0]
    assert status(run(history(decaying(10), grads=grads)), "grad_norm_spikes") == "ok"


# --- the learning-rate schedule ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "constant_with_warmup"])
def test_the_schedules_are_transformers_own(kind):
    import torch
    from transformers import get_scheduler

    warmup = 0 if kind == "constant" else 7
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    scheduler = get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=TOTAL)
    mine = Schedule(3e-4, kind, warmup, TOTAL)
    for step in range(TOTAL + 1):
        assert mine.rate(step) == pytest.approx(scheduler.get_last_lr()[0], rel=1e-9, abs=1e-15), (kind, step)
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant_with_warmup"])
def test_a_learning_rate_that_follows_the_schedule_is_ok(kind):
    schedule = Schedule(1e-3, kind, 10, TOTAL)
    result = run(history(decaying(TOTAL), rate=schedule.rate), schedule=schedule)
    assert status(result, "learning_rate") == "ok", detail(result, "learning_rate")


def test_the_rate_of_the_step_itself_is_accepted_too():
    """transformers before 5 logged the rate after the scheduler's step: schedule(n) rather than schedule(n - 1)."""
    schedule = Schedule(1e-3, "cosine", 10, TOTAL)
    result = run(history(decaying(TOTAL), rate=lambda s: schedule.rate(s + 1)), schedule=schedule)
    assert status(result, "learning_rate") == "ok"


def test_constant_with_a_warmup_configured_never_warms_up():
    schedule = Schedule(1e-3, "constant", 10, TOTAL)
    result = run(history(decaying(TOTAL), rate=lambda s: 1e-3), schedule=schedule)
    assert status(result, "learning_rate") == "warning"
    assert "never warmed up" in result["reasons"][0] and "constant_with_warmup" in result["reasons"][0]
    assert "at step 1, expected 0" in result["reasons"][0]


def test_a_rate_that_never_decays_is_reported():
    schedule = Schedule(1e-3, "cosine", 0, TOTAL)
    result = run(history(decaying(TOTAL, rate=0.97), rate=lambda s: 1e-3), schedule=schedule)
    assert status(result, "learning_rate") == "warning"
    assert "did not decay as the cosine schedule says" in result["reasons"][0]


@pytest.mark.parametrize(("offset", "expected"), [(0.05 * 1e-3 * 0.999, "ok"), (0.05 * 1e-3 * 1.01, "warning")])
def test_learning_rate_edge_is_the_tolerance(offset, expected):
    schedule = Schedule(1e-3, "constant", 0, TOTAL)
    result = run(history(decaying(10), rate=lambda s: 1e-3 + offset), schedule=schedule)
    assert status(result, "learning_rate") == expected


# --- the verdict, the settings, the stop --------------------------------------------------------------------


def test_failed_wins_over_warnings_and_its_reasons_come_first():
    grads = [1.0] * 8 + [50.0, 1.0]
    result = run(history([4.0, 4.0, 4.1, 4.0, 4.2, 4.0, 4.1, 4.0, 4.0, 4.0], grads=grads))
    assert result["verdict"] == "failed"
    assert "never improved" in result["reasons"][0] and "gradient norm spiked" in result["reasons"][-1]


def test_settings_take_the_schema_defaults_and_refuse_unknown_keys():
    assert Settings.of({}) == Settings() and Settings.of({"window": 3}).window == 3
    assert dataclasses.asdict(Settings()) == {k: default(f"training.convergence.{k}")
                                              for k in dataclasses.asdict(Settings())}
    with pytest.raises(StageError, match=r"training.convergence: unknown keys \['windw'\]"):
        Settings.of({"windw": 3})


@pytest.mark.parametrize(("logs", "stops"), [
    ({"loss": math.nan, "grad_norm": 1.0}, True),
    ({"loss": 2.0, "grad_norm": math.inf}, True),
    ({"loss": 2.0, "grad_norm": 1.0}, False),
    ({"eval_loss": 2.0}, False),
])
def test_training_stops_at_the_first_non_finite_loss_without_saving_that_step(logs, stops):
    from transformers import TrainerControl, TrainerState

    callback, control = stop_on_non_finite(), TrainerControl(should_save=True, should_evaluate=True)
    state = TrainerState(global_step=12)
    callback.on_log(None, state, control, logs=logs)
    assert control.should_training_stop is stops and control.should_save is not stops
    assert control.should_evaluate is not stops and callback.step == (12 if stops else None)
