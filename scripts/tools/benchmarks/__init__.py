"""The developer tools' benchmarks (scripts/tools/bench.py: train vs a plain TRL baseline, streaming merge vs peft,
workflow overhead) and the GPU check (scripts/tools/gpu_check.py: its steps, report and bundle). Beside the
library, not in it: hpc_finetune never imports this package."""
