# Container stage: the verified finetune.sif that the stages needing the training stack run in
# (scripts/container.py; README, "Container"). With container.runtime none (the default: demo, CI, development)
# nothing here runs and the stages run on the host.
#
# The seam that runs the other stages in the image (IN_IMAGE, CONTAINER_IMAGE) is defined in common.smk.

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
        build=container_build_inputs(config) if CONTAINER["source"] == "build" else [],
        script=script("container"),
        code=code_inputs("container"),
    output:
        image=container_image(config),
        record=container_image(config) + ".json",
        squashfs=charliecloud_outputs(config),
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
