# Model stage: make the base model available and record where it is (model.json).
# Sources: demo (build the tiny model), local (a directory), hub (a git-lfs clone into the shared cache,
# scripts/hub_cache.py). `model` is a CPU job of its own so that a profile can send it where the network is
# (a login or transfer partition) while the GPU stages run on nodes without internet.

# What the base model is: a change re-runs the model stage and every stage after it.
MODEL_SETTINGS = (
    pick(
        MODEL, "source", "model_id", "revision", "model_cache_dir", "trust_remote_code"
    )
    if MODEL["source"] == "hub"
    else {
        **pick(MODEL, "source", "model_id", "revision", "trust_remote_code"),
        "path": (
            out(config, "model", "demo") if MODEL["source"] == "demo" else MODEL["path"]
        ),
    }
)
# How to fetch a hub model, not what it is. Passed as a resource, which Snakemake does not compare between
# runs (params it does): a new mirror URL, token file or disk reserve, or asking for an update, re-runs
# nothing by itself and takes effect when the model stage runs. The token is never here: the job reads it
# from HF_TOKEN or from the token file.
HUB_FETCH = (
    stage_args(**pick(MODEL, "hub_url", "token_file", "update", "min_free_gb"))
    if MODEL["source"] == "hub"
    else ""
)


rule build_demo_model:
    input:
        data=DATA.inputs,
        script=script("build_demo_model"),
        code=code_inputs("build_demo_model"),
        image=CONTAINER_IMAGE,
    output:
        directory(out(config, "model", "demo")),
    log:
        out(config, "logs", "build_demo_model.log"),
    conda:
        "../envs/finetune.yaml"
    resources:
        in_image=IN_IMAGE,
        mem_mb=RESOURCES["cpu_mem_mb"],
        runtime=RESOURCES["cpu_runtime"],
    params:
        # the tokenizer is trained on the dataset's text, read as the data stage reads it
        args=stage_args(
            data=DATA.path,
            **pick(
                DATASET,
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
        demo=out(config, "model", "demo") if MODEL["source"] == "demo" else [],
        script=script("prepare_model"),
        code=code_inputs("prepare_model"),
    output:
        out(config, "model", "model.json"),
    log:
        out(config, "logs", "model.log"),
    conda:
        "../envs/finetune.yaml"
    resources:
        mem_mb=RESOURCES["cpu_mem_mb"],
        runtime=RESOURCES["cpu_runtime"],
        hub_fetch=HUB_FETCH,
    params:
        args=stage_args(**MODEL_SETTINGS),
    shell:
        "python {input.script} {params.args} {resources.hub_fetch} --output {output} > {log} 2>&1"
