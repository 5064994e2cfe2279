"""What the GPU check's figures must show (CHECKS: step -> the problems found in its figures, none when it passes)
and the summary table printed at its end."""

from __future__ import annotations

from typing import Any


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(figures: dict, path: str, problems: list[str]) -> None:
    value: Any = figures
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    if not (_num(value) and value > 0):
        problems.append(f"{path} is {value!r}, not a positive number")


def check_m(f: dict) -> list[str]:
    problems: list[str] = []
    _positive(f, "weights_bytes", problems)
    return problems


def check_a(f: dict) -> list[str]:
    problems: list[str] = []
    if f.get("exit_code") != 0:
        problems.append(f"snakemake exit status {f.get('exit_code')}")
    for part in ("preflight", "train"):
        if (f.get(part) or {}).get("device") != f.get("expected_device"):
            problems.append(f"{part} device {(f.get(part) or {}).get('device')!r}, expected {f.get('expected_device')!r}")
    train, merge, evaluate = f.get("train") or {}, f.get("merge") or {}, f.get("evaluate") or {}
    if train.get("quantization") != "4bit":
        problems.append(f"train quantization {train.get('quantization')!r}, expected 4bit")
    if not f.get("dry") and train.get("bf16") is not True:
        problems.append("train did not use bf16 on the GPU")
    first, last = train.get("train_loss_first"), train.get("train_loss_last")
    if not (_num(first) and _num(last) and last < first):
        problems.append(f"train loss did not fall ({first} -> {last})")
    diff, tol = merge.get("max_abs_logit_diff"), merge.get("tolerance")
    # in 16 bits the merge stage has a second criterion (scripts/merge.py); that it passed, its exit status says
    if not _num(diff) or (merge.get("dtype") == "float32" and not (_num(tol) and diff <= tol)):
        problems.append(f"merged logits differ by {diff} (tolerance {tol})")
    if not _num(evaluate.get("finetuned_eval_loss")) or not evaluate.get("samples_generated"):
        problems.append("evaluate gave no eval loss or generated nothing")
    return problems


def check_bench_train(f: dict, gpu: bool | None = None) -> list[str]:
    problems: list[str] = []
    results = f.get("results") or {}
    if gpu is None:  # bench.py rates a CPU by a measured matmul, a GPU by its datasheet
        gpu = not str(f.get("peak_source", "measured")).startswith("measured")
    for kind in ("baseline", "ours"):
        if kind not in results:
            problems.append(f"no {kind} run measured")
    for kind, r in results.items():
        for key in ("tokens_per_s", "step_time_s", "parameters"):
            _positive(r, key, problems)
        if r.get("mfu") is not None and not 0 < r["mfu"] < 1:
            problems.append(f"{kind}: MFU {r['mfu']} outside (0, 1)")
        if gpu and not (_num(r.get("peak_gpu_gib")) and r["peak_gpu_gib"] > 0
                        and r.get("peak_gpu_reserved_gib", 0) >= r["peak_gpu_gib"]):
            problems.append(f"{kind}: peak GPU memory missing or reserved < allocated")
    if results.get("ours") and results.get("baseline") and not _num(f.get("speedup_tokens_per_s")):
        problems.append("no ours/baseline ratio")
    return problems


def check_c(f: dict) -> list[str]:
    problems = check_bench_train(f)
    measured = set(f.get("results") or {}) | set(f.get("failed") or {})
    problems += [f"lever {name} neither measured nor failed" for name, kind in (f.get("levers") or {}).items()
                 if kind not in measured and f.get("complete")]
    return problems


def check_d(f: dict) -> list[str]:
    problems: list[str] = []
    for method in ("streaming", "peft"):
        r = (f.get("results") or {}).get(method)
        if not r:
            problems.append(f"no {method} merge measured")
            continue
        for key in ("merge_s", "peak_rss_mb"):
            _positive(r, key, problems)
    return problems


def check_e(f: dict) -> list[str]:
    problems: list[str] = []
    if f.get("exit_code") != 0:
        problems.append(f"snakemake exit status {f.get('exit_code')}")
    _positive(f, "train_job_s", problems)
    _positive(f, "train.steps", problems)
    _positive(f, "train.train_loss_last", problems)
    if not f.get("adapter_saved"):
        problems.append("no adapter saved")
    if (f.get("train") or {}).get("device") != f.get("expected_device"):
        problems.append(f"trained on {(f.get('train') or {}).get('device')!r}, expected {f.get('expected_device')!r}")
    return problems


CHECKS = {"m": check_m, "a": check_a, "b": check_bench_train, "c": check_c, "d": check_d, "e": check_e}


def _f(value: Any, spec: str = ".3g") -> str:
    return format(value, spec) if _num(value) else "n/a"


def _bench_row(f: dict) -> str:
    results = f.get("results") or {}
    ours, base = results.get("ours") or {}, results.get("baseline") or {}
    mem = (f"peak {_f(ours.get('peak_gpu_gib'), '.2f')} GiB alloc / {_f(ours.get('peak_gpu_reserved_gib'), '.2f')} "
           f"reserved (baseline {_f(base.get('peak_gpu_gib'), '.2f')})" if "peak_gpu_gib" in ours else
           f"peak RSS {_f(ours.get('peak_rss_mb'), ',.0f')} MB")
    mfu = ours.get("mfu")
    return (f"ours {_f(ours.get('tokens_per_s'), ',.0f')} tok/s vs baseline {_f(base.get('tokens_per_s'), ',.0f')} "
            f"({_f(f.get('speedup_tokens_per_s'), '.2f')}x); {mem}; MFU {format(mfu, '.1%') if _num(mfu) else 'n/a'}")


def _figures(name: str, f: dict) -> str:
    if f.get("status") == "skipped":
        return f.get("reason", "")
    if name == "m":
        return f"{f.get('arch')}: {_f(f.get('parameters'), ',')} parameters, built in {_f(f.get('build_s'))} s"
    if name == "a":
        t, m, e, p = (f.get(k) or {} for k in ("train", "merge", "evaluate", "preflight"))
        return (f"preflight {p.get('device')} bf16 {p.get('bf16')}; loss {_f(t.get('train_loss_first'))} -> "
                f"{_f(t.get('train_loss_last'))}; merge {m.get('dtype')} logit diff {_f(m.get('max_abs_logit_diff'))}; "
                f"eval loss {_f(e.get('base_eval_loss'))} -> {_f(e.get('finetuned_eval_loss'))}")
    if name in ("b", "c"):
        s = f.get("settings") or {}
        return f"mb {s.get('micro_batch_size')} x ga {s.get('gradient_accumulation')}, seq {s.get('max_seq_length')}: " + _bench_row(f)
    if name == "d":
        r = f.get("results") or {}
        return "; ".join(f"{m} {_f((r.get(m) or {}).get('merge_s'), '.1f')} s, "
                         f"{_f((r.get(m) or {}).get('peak_rss_mb'), ',.0f')} MB RSS" for m in ("streaming", "peft"))
    if name == "e":
        speed = f.get("speedup_vs_reference")
        return (f"{f.get('rows')} rows (mean {f.get('row_tokens_mean')} tokens) x 1 epoch: train job "
                f"{_f(f.get('train_job_s'), '.0f')} s" + (f", {speed:.1f}x faster than 25 min (A100-40GB)"
                                                          if _num(speed) else " (dry: not comparable)"))
    return ""


def summary_rows(results: dict[str, dict], sizes: Any) -> list[tuple[str, str, str, str]]:
    rows = [("step", "status", "s", "figures")]
    for name in ("m", "a", "b", "c", "d", "e"):
        if name in results:
            f = results[name]
            rows.append((name, f.get("status", ""), _f(f.get("elapsed_s"), ".0f"), _figures(name, f)))
    c = results.get("c") or {}
    ours = ((c.get("results") or {}).get("ours") or {}).get("tokens_per_s")
    for lever, kind in (c.get("levers") or {}).items():
        r = (c.get("results") or {}).get(kind)
        why = (c.get("failed") or {}).get(kind)
        text = (f"{_f(r['tokens_per_s'], ',.0f')} tok/s, {_f(r['tokens_per_s'] / ours, '.2f')}x ours" if r and ours
                else f"failed: {why}" if why else "not run")
        rows.append((f"c:{lever}", "", "", text))
    for lever, why in (c.get("levers_skipped") or {}).items():
        rows.append((f"c:{lever}", "skipped", "", why))
    return rows
