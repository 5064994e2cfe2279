# Merge stage: reload the base unquantised, merge the adapter, save full weights, and prove that the merged
# model's logits match base+adapter. One per run.


rule merge:
    input:
        model=lambda wildcards: model_out(of_run(wildcards), "model.json"),
        adapters=out(RUN, "adapters"),
        eval=lambda wildcards: data_out(of_run(wildcards), "eval.jsonl"),
        script=script("merge"),
        code=code_inputs("merge"),
        image=CONTAINER_IMAGE,
    output:
        merged=directory(out(RUN, "merged")),
        report=out(RUN, "metrics", "merge.json"),
    log:
        out(RUN, "logs", "merge.log"),
    benchmark:
        out(RUN, "benchmarks", "merge.tsv")
    conda:
        "../envs/finetune.yaml"
    resources:
        in_image=IN_IMAGE,
        mem_mb=lambda wildcards, attempt: scaled(
            of_run(wildcards), of_run(wildcards)["resources"]["gpu_mem_mb"]
        )(wildcards, attempt),
        runtime=lambda wildcards, attempt: scaled(
            of_run(wildcards), of_run(wildcards)["resources"]["gpu_runtime"]
        )(wildcards, attempt),
        gpu=lambda wildcards: of_run(wildcards)["resources"]["gpus"],
    params:
        args=lambda wildcards: stage_args(
            **pick(
                of_run(wildcards)["merge"],
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
