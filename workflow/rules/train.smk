# Train stage: TRL SFTTrainer with LoRA / QLoRA. Checkpoints live outside the declared outputs (keyed by a
# fingerprint of the training settings) so that an interrupted run resumes instead of starting over.
# scripts/launch.py starts one process per allocated GPU (torchrun), or one launcher per node through srun; `exec`
# leaves no shell between Snakemake and the launcher. The launcher runs on the host (srun and squeue are not in
# the image) and puts the container prefix in front of what it starts, after srun. In a Slurm job the launcher
# has training checkpoint and stop resources.train_stop_before seconds before the time limit; the next run (or a
# retry) resumes.


rule train:
    input:
        model=out(config, "model", "model.json"),
        train=out(config, "data", "train.jsonl"),
        eval=out(config, "data", "eval.jsonl"),
        preflight=out(config, "preflight.json"),
        script=script("train"),
        launcher=script("launch"),
        code=code_inputs("train", "launch"),
        image=CONTAINER_IMAGE,
    output:
        adapters=directory(out(config, "adapters")),
        metrics=out(config, "metrics", "train.json"),
        resources=out(config, "metrics", "resources.csv"),
    log:
        out(config, "logs", "train.log"),
    benchmark:
        out(config, "benchmarks", "train.tsv")
    conda:
        "../envs/finetune.yaml"
    threads: max(1, RESOURCES["cpus_per_gpu"] * max(1, RESOURCES["gpus"]))
    resources:
        **train_placement(config),
        in_image=IN_IMAGE,
        # the floor, plus the prepared rows memory-mapped (README, "Data at any size")
        mem_mb=follows_data(config, RESOURCES["train_mem_mb"], ("train", "eval"), 1.0),
        runtime=scaled(config, RESOURCES["train_runtime"]),
        stop_before=RESOURCES["train_stop_before"],
        # how the run is watched (README, "Seeing a run"): a resource, so turning MLflow on re-runs nothing
        watch=stage_args(
            resource_interval_s=TRACKING["resource_interval_s"],
            mlflow=TRACKING["mlflow"],
            mlflow_experiment=TRACKING["experiment"],
            run_name=config["run_name"],
        ),
    params:
        args=stage_args(**TRAINING),
        launch=stage_args(
            **pick(RESOURCES, "gpus", "nodes"),
            processes=RESOURCES["processes_per_node"],
        ),
        checkpoints=out(config, "checkpoints"),
        tensorboard=out(config, "logs", "tensorboard"),
    shell:
        "exec python {input.launcher} {params.launch} --in-image={resources.in_image:q}"
        " --stop-before {resources.stop_before} --lock {params.checkpoints}/.lock --preflight {input.preflight} --"
        " {input.script} {params.args} --model-json {input.model} --train-data {input.train}"
        " --eval-data {input.eval} --preflight {input.preflight} --output-dir {output.adapters}"
        " --metrics-out {output.metrics} --checkpoint-root {params.checkpoints}"
        " --tensorboard-dir {params.tensorboard} --resources-out {output.resources} {resources.watch}"
        " > {log} 2>&1"
