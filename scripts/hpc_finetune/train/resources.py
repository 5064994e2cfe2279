"""Resource usage over time of the train job: a background thread of rank 0 samples, every few seconds, the memory,
utilisation, power and temperature of each GPU the job sees (NVML, nvidia-ml-py) and the train process's RSS
(psutil) and CPU time into one CSV; the summary gives the peak and the mean of each column per device.

CSV columns: elapsed_s, step, device (`cpu` for the process, `gpu<N>` for the GPU of NVML index N), memory_mib
(RSS for cpu, device memory used for a GPU), utilization_pct (CPU percent of one core for cpu, so up to 100 x
cores, over the time since the row before; the process's CPU time is read with the row's clock, so percent x
interval adds up to the CPU time used however late the sampler thread runs on a busy machine), power_w,
temperature_c (GPU only; empty for cpu). The sampler never fails training: a device that stops answering is left
out of the next rows.
"""

from __future__ import annotations

import csv
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from hpc_finetune.io.cli import log

COLUMNS = ("elapsed_s", "step", "device", "memory_mib", "utilization_pct", "power_w", "temperature_c")
MEASURES = ("memory_mib", "utilization_pct", "power_w", "temperature_c")
MIB = 1 << 20


def nvml_devices() -> list[tuple[str, object]]:
    """(name, NVML handle) of each GPU this process may use: the ones CUDA_VISIBLE_DEVICES names (indices or
    UUIDs), else all. Empty without NVML (no driver, no GPU, no nvidia-ml-py)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        if visible is None:
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        else:
            handles = [pynvml.nvmlDeviceGetHandleByUUID(v) if v.startswith(("GPU-", "MIG-"))
                       else pynvml.nvmlDeviceGetHandleByIndex(int(v)) for v in visible.split(",") if v.strip()]
        return [(f"gpu{pynvml.nvmlDeviceGetIndex(h)}", h) for h in handles]
    except Exception as err:
        log.warning("resource sampling: NVML lists no usable GPU (%s); sampling the process only", err)
        return []


def gpu_sample(handle) -> dict:
    import pynvml

    row = {"memory_mib": round(pynvml.nvmlDeviceGetMemoryInfo(handle).used / MIB, 1),
           "utilization_pct": pynvml.nvmlDeviceGetUtilizationRates(handle).gpu}
    try:  # not every board reports power
        row["power_w"] = round(pynvml.nvmlDeviceGetPowerUsage(handle) / 1000, 1)
    except pynvml.NVMLError:
        pass
    row["temperature_c"] = pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
    return row


class ResourceSampler:
    """`with ResourceSampler(path, interval, step=...)`: a row per device at the start, every `interval` seconds
    and at the end. `step()` gives the training step to record with each sample."""

    def __init__(self, path: str | Path, interval: float, step: Callable[[], int] = lambda: 0):
        import psutil

        self.path, self.interval, self.step = Path(path), interval, step
        self.process = psutil.Process()
        self.gpus = nvml_devices()
        self.rows: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="resource-sampler", daemon=True)

    def __enter__(self) -> ResourceSampler:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "w", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=COLUMNS)
        self._writer.writeheader()
        self._start = time.monotonic()
        self._last: tuple[float, float] | None = None  # (clock, CPU seconds) of the sample before
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        self._fh.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        now, cpu = time.monotonic(), time.process_time()  # together: the row's time is its CPU reading's
        base = {"elapsed_s": round(now - self._start, 3), "step": self._step()}
        rows = [{**base, "device": "cpu", "memory_mib": round(self.process.memory_info().rss / MIB, 1),
                 "utilization_pct": self._cpu_percent(now, cpu)}]
        for name, handle in list(self.gpus):
            try:
                rows.append({**base, "device": name, **gpu_sample(handle)})
            except Exception as err:
                log.warning("resource sampling: %s stopped answering (%s); no more samples of it", name, err)
                self.gpus.remove((name, handle))
        self.rows += rows
        self._writer.writerows(rows)
        self._fh.flush()

    def _cpu_percent(self, now: float, cpu: float) -> float:
        """Percent of one core this process used since the sample before (0 for the first sample)."""
        last, self._last = self._last, (now, cpu)
        if last is None or now <= last[0]:
            return 0.0
        return round(100 * (cpu - last[1]) / (now - last[0]), 1)

    def _step(self) -> int:
        try:
            return int(self.step())
        except Exception:  # the trainer's state is not there yet
            return 0

    def summary(self) -> dict:
        return summarize(self.rows)


def summarize(rows: list[dict]) -> dict:
    """{device: {measure_peak, measure_mean}} over the samples (values may be strings, as read from the CSV)."""
    out: dict = {}
    for device in dict.fromkeys(r["device"] for r in rows):
        values = {m: [float(r[m]) for r in rows if r["device"] == device and r.get(m) not in (None, "")]
                  for m in MEASURES}
        out[device] = {f"{m}_{kind}": round(fn(v), 1) for m, v in values.items() if v
                       for kind, fn in (("peak", max), ("mean", lambda v: sum(v) / len(v)))}
        out[device]["samples"] = sum(r["device"] == device for r in rows)
    return out


def read_resources(path: str | Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    """Rows for the train stage's summary table: peak / mean of each measure per device."""
    units = {"memory_mib": "MiB", "utilization_pct": "%", "power_w": "W", "temperature_c": "°C"}
    rows = []
    for device, values in summary.items():
        parts = [f"{m.split('_')[0]} {values[m + '_peak']:g} / {values[m + '_mean']:g} {units[m]}"
                 for m in MEASURES if m + "_peak" in values]
        rows.append((f"{device} peak / mean", ", ".join(parts)))
    return rows
