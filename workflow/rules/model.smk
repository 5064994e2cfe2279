# Model stage: make the base model available and record where it is (model.json).
# Sources: demo (build the tiny model), local (a directory). The hub source (git-lfs cache) plugs in here.

MODEL = config["model"]


rule build_demo_model:
    input:
        data=config["dataset"]["path"],
        script=script("build_demo_model"),
    output:
        directory(out(config, "model", "demo")),
    log:
        out(config, "logs", "build_demo_model.log"),
    conda:
        "../envs/finetune.yaml"
    resources:
        mem_mb=config["resources"]["cpu_mem_mb"],
        runtime=config["resources"]["cpu_runtime"],
    shell:
        "python {input.script} --data {input.data} --output {output} > {log} 2>&1"


rule model:
    input:
        demo=out(config, "model", "demo") if MODEL["source"] == "demo" else [],
        script=script("prepare_model"),
    output:
        out(config, "model", "model.json"),
    log:
        out(config, "logs", "model.log"),
    conda:
        "../envs/finetune.yaml"
    resources:
        mem_mb=config["resources"]["cpu_mem_mb"],
        runtime=config["resources"]["cpu_runtime"],
    params:
        args=stage_args(
            source=MODEL["source"],
            path=(
                out(config, "model", "demo")
                if MODEL["source"] == "demo"
                else MODEL["path"]
            ),
            model_id=MODEL["model_id"],
            revision=MODEL["revision"],
            trust_remote_code=MODEL["trust_remote_code"],
        ),
    shell:
        "python {input.script} {params.args} --output {output} > {log} 2>&1"
