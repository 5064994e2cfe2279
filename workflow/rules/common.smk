# Included first by the Snakefile: the resolved config, the names every rule file uses, and the helpers
# (hpc_finetune.workflow: config, paths, slurm, container). A rule file uses only what is defined here and in
# itself, so the include order of the others does not matter.

import atexit
import json
import os
import sys

from pathlib import Path

try:
    import hpc_finetune
except ModuleNotFoundError as err:
    sys.exit(
        f"The workflow's library is not importable ({err}). Install the project into the environment that runs "
        f"Snakemake: `make env` in {workflow.basedir}, or `pip install -e {workflow.basedir}`."
    )
# The library must be this workflow's own: its modules are the rules' code inputs and what the stages run.
if (
    not Path(hpc_finetune.__file__)
    .resolve()
    .is_relative_to(Path(workflow.basedir).resolve())
):
    sys.exit(
        f"The hpc_finetune importable here ({Path(hpc_finetune.__file__).resolve().parent}) is not the one of this "
        f"workflow ({workflow.basedir}/scripts): install this checkout into the environment (`make env` in "
        f"{workflow.basedir}, or `pip install -e {workflow.basedir}`)."
    )
from hpc_finetune.workflow.config import ConfigError
from hpc_finetune.workflow.controller import Controller
from hpc_finetune.workflow.runlock import RunInUse
from snakemake.exceptions import WorkflowError
from hpc_finetune.workflow.dataset import data_input, dataset_inputs
from hpc_finetune.workflow.experiment import (
    alternatives,
    experiment_on,
    experiment_tags,
    leaderboard_inputs,
    leaderboard_entries,
    resolve_experiment,
)
from hpc_finetune.workflow.container import (
    charliecloud_outputs,
    check_container,
    container_build_inputs,
    container_definition,
    container_environment,
    container_identity,
    container_image,
    container_on,
    container_prefix,
    prepare_scratch,
    project_commit,
)
from hpc_finetune.workflow.paths import (
    base_out,
    code_inputs,
    data_out,
    final_model,
    final_targets,
    hub_upload_dirs,
    local_dataset,
    model_out,
    out,
    pick,
    report_inputs,
    script,
    stage_args,
    stage_key,
    summary_config,
    summary_inputs,
    upload_dirs,
)
from hpc_finetune.workflow.slurm import (
    follows_data,
    run_placement,
    scaled,
    status_command_problem,
    train_placement,
)
from hpc_finetune.tracking.mlflow_run import tracking_environment
from hpc_finetune.serve.plan import evaluate_engine, serve_plan, served_dirs

# Every run, resolved and validated before any job (README, "Experiments"): {run name: its config}. A config
# without runs:/sweep: is the one run run_name, as it always was. --config overrides hold for every run.
try:
    RUNS = resolve_experiment(config, workflow.config_settings.overwrite_config)
except ConfigError as err:
    sys.exit(f"Invalid configuration (fix config.yaml or --config):\n{err}")
EXPERIMENT = experiment_on(config)
config.clear()
config.update(
    {k: v for k, v in next(iter(RUNS.values())).items() if not k.startswith("_")}
)
# The runs that train (all but the base-only entries of an experiment), and the configs of the stages runs share,
# by their content key (stage_dir: the run's own directory for a single run).
TRAINED = {name: cfg for name, cfg in RUNS.items() if not cfg.get("_base_only")}
MODELS = {stage_key(c, "model"): c for c in RUNS.values()}
DATAS = {stage_key(c, "data"): c for c in RUNS.values()}
BASES = {stage_key(c, "base"): c for c in RUNS.values()} if EXPERIMENT else {}
OUT = config["output_dir"]
# Output paths of the per-run stages: {output_dir}/{run}/...
RUN = {"output_dir": OUT, "run_name": "{run}"}


def of_run(wildcards):
    return RUNS[wildcards.run]


def run_labels(**labels):
    """The `snakemake --report` labels of a run's page or figure: in an experiment the run comes first, so that each
    category's table tells the runs apart (Snakemake fills in {run})."""
    return {"run": "{run}", **labels} if EXPERIMENT else labels


def of_model(wildcards):
    return MODELS[wildcards.mkey]


def of_data(wildcards):
    return DATAS[wildcards.dkey]


def of_base(wildcards):
    return BASES[wildcards.bkey]


MODEL = config["model"]
DATASET = config["dataset"]
TRAINING = config["training"]
MERGE = config["merge"]
EVALUATE = config["evaluate"]
UPLOAD = config["upload"]
HUB_UPLOAD = config["hub_upload"]
CONTAINER = config["container"]
RESOURCES = config["resources"]
TRACKING = config["tracking"]
# MLflow (README, "Seeing a run"): the tracking URI reaches the jobs through the environment only.
os.environ.update(tracking_environment(config, os.environ))

# The dataset the stages read: dataset.path, or the cache that fetch_dataset fills; for s3:// named after the
# objects listed here, for a hub dataset the snapshot of the commit dataset.revision names now (README, "Datasets
# in buckets", "Hub datasets"). At parse time on purpose: a missing bucket, key, dataset or revision, or no
# credentials, stops the workflow before anything runs, and a changed object or a moved branch re-runs data
# preparation. Asked once per distinct dataset of the runs, not once per run.
try:
    DATA_INPUTS = dataset_inputs(RUNS, main_process=workflow.is_main_process)
except ConfigError as err:
    sys.exit(f"Dataset not readable (fix it before anything runs):\n{err}")
# The one dataset fetch of the experiment (rule fetch_dataset), or None.
FETCH = next((d.fetch for d in DATA_INPUTS.values() if d.fetch), None)


def data_of(cfg):
    """The dataset input (path, rule inputs, fetch record) of a run's or shared stage's config."""
    return data_input(DATA_INPUTS, cfg)


# Container (README, "Container"). At parse time on purpose: a missing runtime or image must stop the workflow
# before anything is submitted, the scratch directory must exist before the first `--bind` of it, and the
# secrets reach every job only through the environment Snakemake hands down (never a command line).
if container_on(config):
    try:
        check_container(config)
    except ConfigError as err:
        sys.exit(f"Container not usable (fix it before anything is submitted):\n{err}")
    prepare_scratch(config)
    os.environ.update(container_environment(config, os.environ))

# The seam, used by every rule that runs the stack (build_demo_model, prepare_data, preflight, train, merge,
# evaluate): `resources: in_image=IN_IMAGE` and a shell command that starts with {resources.in_image}
# (`apptainer exec --nv --cleanenv --bind ... <sif> `, or nothing), and the image as an input (CONTAINER_IMAGE, or
# none). A resource, not a param: Snakemake does not compare resources between runs, so moving the project
# (absolute bind paths) or switching the runtime re-runs nothing by itself; what a new image re-runs is decided by
# container.retrain_on_new_image. The model fetch and the summary run on the host.
IN_IMAGE = container_prefix(config)
# retrain_on_new_image false: `ancient` keeps the dependency (the image is made first) but a newer image
# re-runs nothing.
CONTAINER_IMAGE = (
    []
    if not container_on(config)
    else (
        container_image(config)
        if CONTAINER["retrain_on_new_image"]
        else ancient(container_image(config))
    )
)

# The train job's GPU and node placement (sbatch options), per run; the runs of an experiment share its shape
# (the resource names a rule declares are fixed), their values may differ.
try:
    PLACEMENT = run_placement(TRAINED)
except ConfigError as err:
    sys.exit(f"Invalid configuration (fix config.yaml or --config):\n{err}")


# The stages' arguments and inputs, from the config of the job's run or shared stage (the rules' params, inputs
# and resources; README, "Experiments").


def model_settings(cfg):
    """What the base model is: a change re-runs the model stage and every stage after it."""
    model = cfg["model"]
    if model["source"] == "hub":
        return pick(
            model,
            "source",
            "model_id",
            "revision",
            "model_cache_dir",
            "trust_remote_code",
        )
    return {
        **pick(model, "source", "model_id", "revision", "trust_remote_code"),
        "path": model_out(cfg, "demo") if model["source"] == "demo" else model["path"],
    }


def hub_fetch(cfg):
    """How to fetch a hub model, not what it is. Passed as a resource, which Snakemake does not compare between
    runs (params it does): a new mirror URL, token file or disk reserve, or asking for an update, re-runs nothing
    by itself and takes effect when the model stage runs. The token is never here: the job reads it from HF_TOKEN
    or from the token file."""
    model = cfg["model"]
    if model["source"] != "hub":
        return ""
    return stage_args(**pick(model, "hub_url", "token_file", "update", "min_free_gb"))


def prepare_data_args(cfg):
    data = data_of(cfg)
    return stage_args(
        path=data.path,
        origin=data.origin,
        **pick(
            cfg["dataset"],
            "format",
            "text_field",
            "split",
            "eval_split",
            "config_name",
            "max_samples",
            "max_eval_samples",
        ),
        **pick(
            cfg["dataset"], "eval_fraction", "long_rows", "max_dropped_fraction", "seed"
        ),
        **pick(cfg["dataset"], "test_path", "test_split"),
        max_seq_length=cfg["training"]["max_seq_length"],
    )


def prepare_data_test(wildcards):
    test_path = of_data(wildcards)["dataset"]["test_path"]
    return local_dataset(test_path) if test_path else []


def preflight_args(cfg):
    training, resources = cfg["training"], cfg["resources"]
    return stage_args(
        **pick(
            training,
            "quantization",
            "max_seq_length",
            "micro_batch_size",
            "gradient_checkpointing",
        ),
        **pick(training, "lora_r", "target_modules", "bf16"),
        **pick(training, "strategy", "cpu_offload", "zero_stage"),
        **pick(resources, "gpus", "nodes", "processes_per_node"),
        **pick(cfg["preflight"], "device", "cpu_max_params", "memory_fraction"),
    )


def train_watch(cfg):
    """How the run is watched (README, "Seeing a run"): a resource, so turning MLflow on re-runs nothing. In an
    experiment the MLflow run is tagged with the run's sweep values."""
    tracking = cfg["tracking"]
    return stage_args(
        resource_interval_s=tracking["resource_interval_s"],
        mlflow=tracking["mlflow"],
        mlflow_experiment=tracking["experiment"],
        run_name=cfg["run_name"],
        **({"mlflow_tags": experiment_tags(cfg)} if EXPERIMENT else {}),
    )


def train_threads(wildcards):
    resources = of_run(wildcards)["resources"]
    return max(1, resources["cpus_per_gpu"] * max(1, resources["gpus"]))


def evaluate_args(cfg, finetuned=True):
    evaluate = cfg["evaluate"]
    return stage_args(
        **pick(
            evaluate,
            "num_samples",
            "max_new_tokens",
            "batch_size",
            "labels",
            "max_detected_labels",
        ),
        **pick(evaluate, "lm_eval_tasks", "lm_eval_limit", "lm_eval_include_path"),
        **pick(evaluate, "group_field", "group_min_rows"),
        **({"merged": cfg["merge"]["merge_full_weights"]} if finetuned else {}),
    )


def evaluate_inputs(wildcards):
    cfg = of_run(wildcards)
    inputs = {
        "model": model_out(cfg, "model.json"),
        "finetuned": final_model(cfg),
        **{name: data_out(cfg, f"{name}.jsonl") for name in ("train", "eval", "test")},
    }
    if EXPERIMENT:
        inputs.update(
            base_metrics=base_out(cfg, "base.json"),
            base_samples=base_out(cfg, "base.jsonl"),
        )
    return inputs


def gpu_resources(of):
    """Memory and time that grow on each retry, and the GPUs, of the config `of(wildcards)`."""
    return {
        "mem_mb": lambda wildcards, attempt: scaled(
            of(wildcards), of(wildcards)["resources"]["gpu_mem_mb"]
        )(wildcards, attempt),
        "runtime": lambda wildcards, attempt: scaled(
            of(wildcards), of(wildcards)["resources"]["gpu_runtime"]
        )(wildcards, attempt),
        "gpu": lambda wildcards: of(wildcards)["resources"]["gpus"],
    }


# vLLM (README, "Serving"), per run: whether the serve_check stage runs and with which interpreter (or image), and
# what the evaluate stage generates with. At parse time on purpose: serve_check.enabled on without a vLLM, or
# evaluate.engine vllm without one, stops the workflow before anything runs.
try:
    SERVE = {name: serve_plan(cfg) for name, cfg in TRAINED.items()}
    # (engine, vLLM command) of each run's evaluate job and of each shared base evaluation, resolved once here
    ENGINE = {name: evaluate_engine(cfg) for name, cfg in RUNS.items()}
    BASE_ENGINE = {key: evaluate_engine(cfg) for key, cfg in BASES.items()}
except ConfigError as err:
    sys.exit(f"vLLM not usable (fix it before anything runs):\n{err}")
# Each run's artifacts (the summary's inputs, the manifest's list, the controller's deliverables), resolved once.
ARTIFACTS = {name: summary_inputs(cfg, SERVE[name].on) for name, cfg in TRAINED.items()}


def engine_args(cfg, engine):
    """The evaluate stage's generator (ENGINE, BASE_ENGINE: evaluate.engine, auto resolved) as arguments; its vLLM
    command is the rule's resource `vllm`."""
    return stage_args(
        engine=engine[0],
        vllm_enforce_eager=cfg["serve_check"]["enforce_eager"],
    )


def serve_check_args(cfg):
    """The serve_check stage's settings, the directories it serves and the data stage's directory."""
    return stage_args(
        **pick(
            cfg["serve_check"],
            "num_prompts",
            "tolerance",
            "dtype",
            "max_model_len",
            "enforce_eager",
        ),
        **{k: d and out(cfg, d) for k, d in served_dirs(cfg).items()},
        data_dir=os.path.dirname(data_out(cfg, "eval.jsonl")),
    )
