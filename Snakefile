"""Fine-tune a base model on a dataset with QLoRA and merge it to safetensors that vLLM serves.

    snakemake --profile profiles/local                # the embedded demo, on a laptop CPU
    snakemake --profile profiles/slurm --config preset=llama3-8b-medical run_name=med

The Snakefile only resolves and validates the config, includes one rule file per stage, and defines `all`.
"""

import sys

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


sys.path.insert(0, f"{workflow.basedir}/workflow")

from helpers import (  # noqa: E402
    ConfigError,
    check_container,
    container_definition,
    container_image,
    container_on,
    container_prefix,
    project_commit,
    final_model,
    final_targets,
    local_dataset,
    out,
    pick,
    resolve_config,
    script,
    stage_args,
    summary_config,
    summary_inputs,
    upload_dirs,
)

try:
    _resolved = resolve_config(config)
except ConfigError as err:
    sys.exit(f"Invalid configuration (fix config.yaml or --config):\n{err}")
config.clear()
config.update(_resolved)


include: "workflow/rules/container.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/preflight.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/summary.smk"
include: "workflow/rules/upload.smk"


rule all:
    default_target: True
    input:
        final_targets(config),
