"""The report's figures, PNG files made with matplotlib's Agg backend (no display): the training curves from the
trainer's log history, resource use over time from metrics/resources.csv, the token length histogram of the
data report, and the stage timings."""

from __future__ import annotations

from pathlib import Path

DPI = 110


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def series(history: list[dict], key: str) -> tuple[list, list]:
    points = [(e["step"], e[key]) for e in history if isinstance(e.get(key), (int, float)) and "step" in e]
    return [p[0] for p in points], [p[1] for p in points]


def tokens_per_second(history: list[dict]) -> tuple[list, list]:
    """Throughput between two logged training steps: input tokens over train_runtime (the trainer's clock of
    this session), both as transformers logs them at each step; a resumed session starts its clock again."""
    steps, rates = [], []
    prev = None
    for e in history:
        if "loss" not in e or "train_runtime" not in e or "num_input_tokens_seen" not in e:
            continue
        if prev and e["train_runtime"] > prev["train_runtime"]:
            steps.append(e["step"])
            rates.append((e["num_input_tokens_seen"] - prev["num_input_tokens_seen"])
                         / (e["train_runtime"] - prev["train_runtime"]))
        elif e.get("train_tokens_per_second"):
            steps.append(e["step"])
            rates.append(e["train_tokens_per_second"])
        prev = e
    return steps, rates


def training_curves(history: list[dict], path: str | Path) -> Path:
    """Loss (train and eval), learning rate, gradient norm and tokens/s over the training steps."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    ax = axes[0][0]
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")):
        x, y = series(history, key)
        if x:
            ax.plot(x, y, style, label=label)
    ax.set(title="Loss", xlabel="step", ylabel="loss")
    if ax.lines and all(v > 0 for line in ax.lines for v in line.get_ydata()):
        ax.set_yscale("log")
    if ax.lines:
        ax.legend()
    for ax, key, title in ((axes[0][1], "learning_rate", "Learning rate"), (axes[1][0], "grad_norm", "Gradient norm")):
        x, y = series(history, key)
        ax.plot(x, y, "-", color="tab:green" if key == "learning_rate" else "tab:red")
        ax.set(title=title, xlabel="step")
    x, y = tokens_per_second(history)
    axes[1][1].plot(x, y, "-", color="tab:purple")
    axes[1][1].set(title="Throughput", xlabel="step", ylabel="tokens/s")
    return _save(fig, path)


def resources_plot(rows: list[dict], path: str | Path) -> Path:
    """Memory, utilisation, power and temperature over time, one line per device (cpu: the train process's RSS
    and CPU percent; gpuN: NVML)."""
    plt = _pyplot()
    gpu = any(r["device"] != "cpu" for r in rows)
    panels = [("memory_mib", "Memory", "MiB"), ("utilization_pct", "Utilisation", "%")]
    if gpu:
        panels += [("power_w", "Power", "W"), ("temperature_c", "Temperature", "°C")]
    fig, axes = plt.subplots(len(panels) // 2, 2, figsize=(11, 3.5 * (len(panels) // 2)), constrained_layout=True,
                             squeeze=False)
    for ax, (key, title, unit) in zip(axes.flat, panels, strict=True):
        for device in dict.fromkeys(r["device"] for r in rows):
            points = [(float(r["elapsed_s"]), float(r[key])) for r in rows
                      if r["device"] == device and r.get(key) not in (None, "")]
            if points:
                label = "train process (RSS, CPU %)" if device == "cpu" else device
                ax.plot([p[0] for p in points], [p[1] for p in points], ".-", label=label)
        ax.set(title=title, xlabel="seconds since training started", ylabel=unit)
        if ax.lines:
            ax.legend()
    if not rows:
        axes.flat[0].text(0.5, 0.5, "no resource samples (metrics/resources.csv) in this run", ha="center",
                          transform=axes.flat[0].transAxes)
    return _save(fig, path)


def token_histogram(report: dict, path: str | Path) -> Path:
    """Token lengths of the kept rows (data report's token_histogram; older reports only have min/mean/max)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5), constrained_layout=True)
    hist = report.get("token_histogram") or {}
    if hist.get("counts"):
        edges = hist["edges"]
        ax.bar(edges[:-1], hist["counts"], width=edges[1] - edges[0], align="edge",
               edgecolor="white")
    else:
        ax.text(0.5, 0.5, "this data report has no token histogram", ha="center", transform=ax.transAxes)
    limit = report.get("max_seq_length")
    if limit and hist.get("edges") and limit <= 2 * hist["edges"][-1]:
        ax.axvline(limit, color="tab:red", linestyle="--", label=f"max_seq_length {limit}")
        ax.legend()
    ax.set(title=f"Token lengths of the {report.get('kept', '?')} kept rows", xlabel="tokens", ylabel="rows")
    return _save(fig, path)


def timings_plot(benchmarks: list[dict], path: str | Path) -> Path:
    """Wall time and peak RSS of each benchmarked stage."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5), constrained_layout=True)
    stages = [b["stage"] for b in benchmarks]
    left.barh(stages, [float(b["s"]) for b in benchmarks], color="tab:blue")
    left.set(title="Wall time", xlabel="seconds")
    right.barh(stages, [float(b["max_rss"]) if b.get("max_rss") not in ("", "NA", None) else 0 for b in benchmarks],
               color="tab:orange")
    right.set(title="Peak RSS", xlabel="MB")
    return _save(fig, path)


def leaderboard_metric(rows: list[dict], metric: str, value_of, best: str | None, path: str | Path) -> Path:
    """The chosen metric per fine-tuned run (bars, the best one darker) with each base model's value marked (a
    dashed line per base entry, and a dot on each run's bar where its own base scored)."""
    plt = _pyplot()
    runs = [r for r in rows if r["kind"] == "finetuned"]
    bases = [r for r in rows if r["kind"] == "base"]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(runs) + 3), 4), constrained_layout=True)
    values = [value_of(r, metric) for r in runs]
    ax.bar([r["name"] for r in runs], [v if v is not None else 0 for v in values],
           color=["tab:green" if r["name"] == best else "tab:blue" for r in runs])
    own = [(r["name"], r.get(f"{metric} base")) for r in runs if r.get(f"{metric} base") is not None]
    if own:
        ax.plot([n for n, _ in own], [v for _, v in own], "kD", label="the run's base model")
    for index, base in enumerate(bases):
        value = value_of(base, metric)
        if value is not None:
            ax.axhline(value, linestyle="--", color=f"C{(index + 3) % 10}", label=f"base: {base['name']}")
    if not runs and not bases:
        ax.text(0.5, 0.5, "no entries", ha="center", transform=ax.transAxes)
    ax.set(title=f"{metric} per run", ylabel=metric)
    ax.tick_params(axis="x", labelrotation=30)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return _save(fig, path)


def eval_loss_overlay(histories: dict[str, list[dict]], path: str | Path) -> Path:
    """The eval-loss curves of all runs, overlaid (step on x)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4), constrained_layout=True)
    for name, history in histories.items():
        x, y = series(history, "eval_loss")
        if x:
            ax.plot(x, y, "o-", label=name)
    if ax.lines:
        ax.legend()
        if all(v > 0 for line in ax.lines for v in line.get_ydata()):
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no eval loss logged by any run", ha="center", transform=ax.transAxes)
    ax.set(title="Eval loss of every run", xlabel="step", ylabel="eval loss")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
