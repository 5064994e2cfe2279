# GPU preflight: report the GPUs, estimate the memory the job needs, choose the training strategy for the train
# job's GPUs (resources.nodes x resources.gpus), and refuse a job that will not fit. One per run.


rule preflight:
    input:
        model=lambda wildcards: model_out(of_run(wildcards), "model.json"),
        script=script("preflight"),
        code=code_inputs("preflight"),
        image=CONTAINER_IMAGE,
    output:
        out(RUN, "preflight.json"),
    log:
        out(RUN, "logs", "preflight.log"),
    conda:
        "../envs/finetune.yaml"
    resources:
        in_image=IN_IMAGE,
        mem_mb=lambda wildcards: of_run(wildcards)["resources"]["gpu_mem_mb"],
        runtime=10,
        gpu=lambda wildcards: of_run(wildcards)["resources"]["gpus"],
    params:
        args=lambda wildcards: preflight_args(of_run(wildcards)),
    shell:
        "{resources.in_image}python {input.script} {params.args} --model-json {input.model} --output {output} > {log} 2>&1"
