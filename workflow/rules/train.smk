# Train stage: TRL SFTTrainer with LoRA / QLoRA. Checkpoints live outside the declared outputs (keyed by a
# fingerprint of the training settings) so that an interrupted run resumes instead of starting over.
# scripts/launch.py starts one process per allocated GPU (torchrun), or one launcher per node through srun; `exec`
# leaves no shell between Snakemake and the launcher. The launcher runs on the host (srun and squeue are not in
# the image) and puts the container prefix in front of what it starts, after srun. In a Slurm job the launcher
# has training checkpoint and stop resources.train_stop_before seconds before the time limit; the next run (or a
# retry) resumes. One per run: the train jobs of an experiment's runs are independent, so Slurm gets each as soon
# as its inputs exist.


rule train:
    input:
        model=lambda wildcards: model_out(of_run(wildcards), "model.json"),
        train=lambda wildcards: data_out(of_run(wildcards), "train.jsonl"),
        eval=lambda wildcards: data_out(of_run(wildcards), "eval.jsonl"),
        preflight=out(RUN, "preflight.json"),
        script=script("train"),
        launcher=script("launch"),
        code=code_inputs("train", "launch"),
        image=CONTAINER_IMAGE,
    output:
        adapters=directory(out(RUN, "adapters")),
        metrics=out(RUN, "metrics", "train.json"),
        resources=out(RUN, "metrics", "resources.csv"),
    log:
        out(RUN, "logs", "train.log"),
    benchmark:
        out(RUN, "benchmarks", "train.tsv")
    conda:
        "../envs/finetune.yaml"
    threads: train_threads
    resources:
        **PLACEMENT,
        in_image=IN_IMAGE,
        # the floor, plus the prepared rows memory-mapped (README, "Data at any size")
        mem_mb=lambda wildcards, input, attempt: follows_data(
            of_run(wildcards),
            of_run(wildcards)["resources"]["train_mem_mb"],
            ("train", "eval"),
            1.0,
        )(wildcards, input, attempt),
        runtime=lambda wildcards, attempt: scaled(
            of_run(wildcards), of_run(wildcards)["resources"]["train_runtime"]
        )(wildcards, attempt),
        stop_before=lambda wildcards: of_run(wildcards)["resources"][
            "train_stop_before"
        ],
        watch=lambda wildcards: train_watch(of_run(wildcards)),
    params:
        args=lambda wildcards: stage_args(**of_run(wildcards)["training"]),
        launch=lambda wildcards: stage_args(
            **pick(of_run(wildcards)["resources"], "gpus", "nodes"),
            processes=of_run(wildcards)["resources"]["processes_per_node"],
        ),
        checkpoints=out(RUN, "checkpoints"),
        tensorboard=out(RUN, "logs", "tensorboard"),
    shell:
        "exec python {input.launcher} {params.launch} --in-image={resources.in_image:q}"
        " --stop-before {resources.stop_before} --lock {params.checkpoints}/.lock --preflight {input.preflight} --"
        " {input.script} {params.args} --model-json {input.model} --train-data {input.train}"
        " --eval-data {input.eval} --preflight {input.preflight} --output-dir {output.adapters}"
        " --metrics-out {output.metrics} --checkpoint-root {params.checkpoints}"
        " --tensorboard-dir {params.tensorboard} --resources-out {output.resources} {resources.watch}"
        " > {log} 2>&1"
