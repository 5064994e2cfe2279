# Evaluate stage: held-out loss of the base and the fine-tuned model, and greedy answers compared with the
# reference answers of training and held-out rows.


rule evaluate:
    input:
        model=out(config, "model", "model.json"),
        finetuned=final_model(config),
        train=out(config, "data", "train.jsonl"),
        eval=out(config, "data", "eval.jsonl"),
        script=script("evaluate"),
        code=code_inputs("evaluate"),
        image=CONTAINER_IMAGE,
    output:
        metrics=out(config, "metrics", "evaluate.json"),
        samples=out(config, "eval", "samples.jsonl"),
    log:
        out(config, "logs", "evaluate.log"),
    benchmark:
        out(config, "benchmarks", "evaluate.tsv")
    conda:
        "../envs/finetune.yaml"
    resources:
        in_image=IN_IMAGE,
        mem_mb=scaled(config, RESOURCES["gpu_mem_mb"]),
        runtime=scaled(config, RESOURCES["gpu_runtime"]),
        gpu=RESOURCES["gpus"],
    params:
        args=stage_args(
            **pick(EVALUATE, "num_samples", "max_new_tokens"),
            merged=MERGE["merge_full_weights"],
        ),
    shell:
        "{resources.in_image}python {input.script} {params.args} --model-json {input.model} --finetuned {input.finetuned}"
        " --train-data {input.train} --eval-data {input.eval} --metrics-out {output.metrics}"
        " --samples-out {output.samples} > {log} 2>&1"
