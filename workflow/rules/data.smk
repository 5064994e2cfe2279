# Data stage: read the dataset in any supported format, normalise, validate, split train/eval, and report.


rule prepare_data:
    input:
        model=out(config, "model", "model.json"),
        data=local_dataset(DATASET["path"]),
        script=script("prepare_data"),
        code=code_inputs("prepare_data"),
        image=CONTAINER_IMAGE,
    output:
        train=out(config, "data", "train.jsonl"),
        eval=out(config, "data", "eval.jsonl"),
        report=out(config, "data", "report.json"),
    log:
        out(config, "logs", "prepare_data.log"),
    conda:
        "../envs/finetune.yaml"
    resources:
        in_image=IN_IMAGE,
        mem_mb=RESOURCES["cpu_mem_mb"],
        runtime=RESOURCES["cpu_runtime"],
    params:
        args=stage_args(
            **pick(
                DATASET,
                "path",
                "format",
                "text_field",
                "split",
                "eval_split",
                "config_name",
                "max_samples",
                "max_eval_samples",
            ),
            **pick(
                DATASET, "eval_fraction", "long_rows", "max_dropped_fraction", "seed"
            ),
            max_seq_length=TRAINING["max_seq_length"],
        ),
    shell:
        "{resources.in_image}python {input.script} {params.args} --model-json {input.model}"
        " --train-out {output.train} --eval-out {output.eval} --report-out {output.report} > {log} 2>&1"
