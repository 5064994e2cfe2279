# Model stage: make the base model available and record where it is (model.json).
# Sources: demo (build the tiny model), local (a directory), hub (a git-lfs clone into the shared cache,
# scripts/hub_cache.py). `model` is a CPU job of its own so that a profile can send it where the network is
# (a login or transfer partition) while the GPU stages run on nodes without internet.
# One per model, not per run: {mkey} is the run's name for a single run, else the content key of what the model
# is (README, "Experiments"), so the runs of an experiment that use one model fetch it once.


rule build_demo_model:
    input:
        data=lambda wildcards: data_of(of_model(wildcards)).inputs,
        script=script("build_demo_model"),
        code=code_inputs("build_demo_model"),
        image=CONTAINER_IMAGE,
    output:
        directory(f"{OUT}/{{mkey}}/model/demo"),
    log:
        f"{OUT}/{{mkey}}/logs/build_demo_model.log",
    conda:
        "../envs/finetune.yaml"
    resources:
        in_image=IN_IMAGE,
        mem_mb=lambda wildcards: of_model(wildcards)["resources"]["cpu_mem_mb"],
        runtime=lambda wildcards: of_model(wildcards)["resources"]["cpu_runtime"],
    params:
        # the tokenizer is trained on the dataset's text, read as the data stage reads it
        args=lambda wildcards: stage_args(
            data=data_of(of_model(wildcards)).path,
            **pick(
                of_model(wildcards)["dataset"],
                "format",
                "text_field",
                "split",
                "eval_split",
                "config_name",
            ),
        ),
    shell:
        "{resources.in_image}python {input.script} {params.args} --output {output} > {log} 2>&1"


rule model:
    input:
        demo=lambda wildcards: (
            model_out(of_model(wildcards), "demo")
            if of_model(wildcards)["model"]["source"] == "demo"
            else []
        ),
        script=script("prepare_model"),
        code=code_inputs("prepare_model"),
    output:
        f"{OUT}/{{mkey}}/model/model.json",
    log:
        f"{OUT}/{{mkey}}/logs/model.log",
    conda:
        "../envs/finetune.yaml"
    resources:
        mem_mb=lambda wildcards: of_model(wildcards)["resources"]["cpu_mem_mb"],
        runtime=lambda wildcards: of_model(wildcards)["resources"]["cpu_runtime"],
        hub_fetch=lambda wildcards: hub_fetch(of_model(wildcards)),
    params:
        args=lambda wildcards: stage_args(**model_settings(of_model(wildcards))),
    shell:
        "python {input.script} {params.args} {resources.hub_fetch} --output {output} > {log} 2>&1"
