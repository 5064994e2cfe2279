"""Fine-tune a base model on a dataset with QLoRA and merge it to safetensors that vLLM serves.

    snakemake --profile profiles/local                # the embedded demo, on a laptop CPU
    snakemake --profile profiles/slurm --config preset=llama3-8b-medical run_name=med
    snakemake --profile profiles/local --configfile workflow/experiments/demo.yaml   # runs:/sweep:, a leaderboard

The Snakefile is the config, the includes (workflow/rules/common.smk first: the resolved config and the
helpers) and `rule all`. README, "Where the code lives".
"""

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


# Each wildcard matches only the names the experiment has (common.smk): runs, and the content keys of the
# stages runs share (the run's own name for a single run).
wildcard_constraints:
    run=alternatives(TRAINED),
    mkey=alternatives(MODELS),
    dkey=alternatives(DATAS),
    bkey=alternatives(BASES),


include: "workflow/rules/controller.smk"
include: "workflow/rules/container.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/preflight.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/serve_check.smk"
include: "workflow/rules/summary.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/upload.smk"
include: "workflow/rules/hub_upload.smk"
include: "workflow/rules/leaderboard.smk"


rule all:
    default_target: True
    input:
        [final_targets(cfg, ARTIFACTS[name]) for name, cfg in TRAINED.items()],
        rules.leaderboard.output if EXPERIMENT else [],
