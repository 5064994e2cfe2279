# Train stage: TRL SFTTrainer with LoRA / QLoRA. Checkpoints live outside the declared outputs (keyed by a
# fingerprint of the training settings) so that an interrupted run resumes instead of starting over.


rule train:
    input:
        model=out(config, "model", "model.json"),
        train=out(config, "data", "train.jsonl"),
        eval=out(config, "data", "eval.jsonl"),
        preflight=out(config, "preflight.json"),
        script=script("train"),
    output:
        adapters=directory(out(config, "adapters")),
        metrics=out(config, "metrics", "train.json"),
    log:
        out(config, "logs", "train.log"),
    benchmark:
        out(config, "benchmarks", "train.tsv")
    conda:
        "../envs/finetune.yaml"
    threads: max(1, config["resources"]["cpus_per_gpu"] * max(1, config["resources"]["gpus"]))
    resources:
        mem_mb=config["resources"]["train_mem_mb"],
        runtime=config["resources"]["train_runtime"],
        gpu=config["resources"]["gpus"],
    params:
        args=stage_args(**TRAINING),
        checkpoints=out(config, "checkpoints"),
        tensorboard=out(config, "logs", "tensorboard"),
    shell:
        "python {input.script} {params.args} --model-json {input.model} --train-data {input.train}"
        " --eval-data {input.eval} --preflight {input.preflight} --output-dir {output.adapters}"
        " --metrics-out {output.metrics} --checkpoint-root {params.checkpoints}"
        " --tensorboard-dir {params.tensorboard} > {log} 2>&1"
