# Merge stage: reload the base unquantised, merge the adapter, save full weights, and prove that the merged
# model's logits match base+adapter.


rule merge:
    input:
        model=out(config, "model", "model.json"),
        adapters=out(config, "adapters"),
        eval=out(config, "data", "eval.jsonl"),
        script=script("merge"),
        code=code_inputs("merge"),
        image=CONTAINER_IMAGE,
    output:
        merged=directory(out(config, "merged")),
        report=out(config, "metrics", "merge.json"),
    log:
        out(config, "logs", "merge.log"),
    benchmark:
        out(config, "benchmarks", "merge.tsv")
    conda:
        "../envs/finetune.yaml"
    resources:
        in_image=IN_IMAGE,
        mem_mb=scaled(config, RESOURCES["gpu_mem_mb"]),
        runtime=scaled(config, RESOURCES["gpu_runtime"]),
        gpu=RESOURCES["gpus"],
    params:
        args=stage_args(
            **pick(
                MERGE,
                "merged_save_format",
                "dtype",
                "max_shard_size",
                "check_samples",
                "tolerance",
                "streaming",
            )
        ),
    shell:
        "{resources.in_image}python {input.script} {params.args} --model-json {input.model} --adapter-dir {input.adapters}"
        " --eval-data {input.eval} --output-dir {output.merged} --report-out {output.report} > {log} 2>&1"
