# Container stage: the verified finetune.sif that the stages needing the training stack run in
# (scripts/container.py; README, "Container"). With container.runtime none (the default: demo, CI, development)
# nothing here runs and the stages run on the host.
#
# The seam, used by every rule that runs the stack (build_demo_model, prepare_data, preflight, train, merge,
# evaluate): `resources: in_image=IN_IMAGE` and a shell command that starts with {resources.in_image}
# (`apptainer exec --nv --cleanenv --bind ... <sif> `, or nothing), and the image as an input (CONTAINER_IMAGE, or
# none). A resource, not a param: Snakemake does not compare resources between runs, so moving the project
# (absolute bind paths) or switching the runtime re-runs nothing by itself; what a new image re-runs is decided by
# container.retrain_on_new_image. The model fetch and the summary run on the host.

import os

from helpers import container_environment, container_identity, container_scratch

CONTAINER = config["container"]
if container_on(config):
    try:
        check_container(config)
    except ConfigError as err:
        sys.exit(f"Container not usable (fix it before anything is submitted):\n{err}")

    (container_scratch(config) / "cache").mkdir(parents=True, exist_ok=True)
    os.environ.update(container_environment(config, os.environ))

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
# What the image is: a change re-runs the container stage (and, with retrain_on_new_image, what runs in it).
CONTAINER_WHAT = stage_args(**container_identity(config))
# How to get it, not what it is: not a re-run trigger (resources are not compared between runs).
CONTAINER_HOW = stage_args(
    **pick(CONTAINER, "runtime", "s3_endpoint", "s3_region", "build_modes"),
    definition=container_definition(config),
    project_commit=project_commit() if CONTAINER["source"] == "build" else "unknown",
)


rule container_image:
    input:
        build=(
            [
                container_definition(config),
                f"{workflow.basedir}/singularity/requirements.txt",
            ]
            if CONTAINER["source"] == "build"
            else []
        ),
        script=script("container"),
    output:
        image=container_image(config),
        record=container_image(config) + ".json",
    log:
        container_image(config) + ".log",
    localrule: True
    conda:
        "../envs/finetune.yaml"
    resources:
        how=CONTAINER_HOW,
    params:
        what=CONTAINER_WHAT,
    shell:
        "python {input.script} {params.what} {resources.how} --output {output.image}"
        " --record-out {output.record} > {log} 2>&1"
