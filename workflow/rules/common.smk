# Included first by the Snakefile: the resolved config, the names every rule file uses, and the helpers
# (hpc_finetune.workflow: config, paths, slurm, container). A rule file uses only what is defined here and in
# itself, so the include order of the others does not matter.

import atexit
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
from hpc_finetune.workflow.config import ConfigError, resolve_config
from hpc_finetune.workflow.controller import Controller
from hpc_finetune.workflow.runlock import RunInUse
from snakemake.exceptions import WorkflowError
from hpc_finetune.workflow.dataset import dataset_input
from hpc_finetune.workflow.container import (
    check_container,
    container_definition,
    container_environment,
    container_identity,
    container_image,
    container_on,
    container_prefix,
    container_scratch,
    project_commit,
)
from hpc_finetune.workflow.paths import (
    code_inputs,
    final_model,
    final_targets,
    hub_upload_dirs,
    local_dataset,
    out,
    pick,
    report_inputs,
    script,
    stage_args,
    summary_config,
    summary_inputs,
    upload_dirs,
)
from hpc_finetune.workflow.slurm import (
    follows_data,
    scaled,
    status_command_problem,
    train_placement,
)
from hpc_finetune.tracking.mlflow_run import tracking_environment
from hpc_finetune.serve.plan import evaluate_engine, serve_plan, served_dirs

try:
    _resolved = resolve_config(config)
except ConfigError as err:
    sys.exit(f"Invalid configuration (fix config.yaml or --config):\n{err}")
config.clear()
config.update(_resolved)

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

# The dataset the stages read: dataset.path, or the cache that rule fetch_dataset fills: for s3:// named after the
# objects listed here, for a hub dataset the snapshot of the commit dataset.revision names now (README, "Datasets
# in buckets", "Hub datasets"). At parse time on purpose: a missing bucket, key, dataset or revision, or no
# credentials, stops the workflow before anything runs, and a changed object or a moved branch re-runs data
# preparation.
try:
    DATA = dataset_input(config, main_process=workflow.is_main_process)
except ConfigError as err:
    sys.exit(f"Dataset not readable (fix it before anything runs):\n{err}")

# Container (README, "Container"). At parse time on purpose: a missing runtime or image must stop the workflow
# before anything is submitted, the scratch directory must exist before the first `--bind` of it, and the
# secrets reach every job only through the environment Snakemake hands down (never a command line).
if container_on(config):
    try:
        check_container(config)
    except ConfigError as err:
        sys.exit(f"Container not usable (fix it before anything is submitted):\n{err}")
    (container_scratch(config) / "cache").mkdir(parents=True, exist_ok=True)
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

# vLLM (README, "Serving"): whether the serve_check stage runs and with which interpreter (or image), and what the
# evaluate stage generates with. At parse time on purpose: serve_check.enabled on without a vLLM, or
# evaluate.engine vllm without one, stops the workflow before anything runs.
try:
    SERVE = serve_plan(config)
    EVALUATE_ENGINE, EVALUATE_VLLM = evaluate_engine(config)
except ConfigError as err:
    sys.exit(f"vLLM not usable (fix it before anything runs):\n{err}")
