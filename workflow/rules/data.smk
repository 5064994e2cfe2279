# Data stage: read the dataset in any supported format, normalise, validate, split train/eval, and report.
# A dataset in a bucket (dataset.path s3://...) is fetched first, on the host that runs Snakemake (compute nodes
# often have no route to the store), into a cache named after the objects' ETags; a hub dataset (org/name) at the
# commit dataset.revision names, into the shared Hugging Face cache (DATA, common.smk).

if DATA.fetch:

    rule fetch_dataset:
        input:
            script=script("fetch_dataset"),
            code=code_inputs("fetch_dataset"),
        output:
            # a hub dataset's snapshot lies in the shared Hugging Face cache, which Snakemake must not clean
            cache=directory(DATA.fetch["output"]) if DATA.fetch["kind"] == "s3" else [],
            record=DATA.fetch["record"],
        log:
            out(config, "logs", "fetch_dataset.log"),
        benchmark:
            out(config, "benchmarks", "fetch_dataset.tsv")
        localrule: True
        conda:
            "../envs/finetune.yaml"
        resources:
            mem_mb=RESOURCES["cpu_mem_mb"],
            runtime=RESOURCES["cpu_runtime"],
        params:
            args=stage_args(
                **{k: v for k, v in DATA.fetch.items() if k not in ("kind", "record")},
                record_out=DATA.fetch["record"],
            ),
        shell:
            "python {input.script} {params.args} > {log} 2>&1"


rule prepare_data:
    input:
        model=out(config, "model", "model.json"),
        data=DATA.inputs,
        origin=DATA.origin or [],
        test=local_dataset(DATASET["test_path"]) if DATASET["test_path"] else [],
        script=script("prepare_data"),
        code=code_inputs("prepare_data"),
        image=CONTAINER_IMAGE,
    output:
        train=out(config, "data", "train.jsonl"),
        eval=out(config, "data", "eval.jsonl"),
        report=out(config, "data", "report.json"),
        test=out(config, "data", "test.jsonl"),
    log:
        out(config, "logs", "prepare_data.log"),
    conda:
        "../envs/finetune.yaml"
    resources:
        in_image=IN_IMAGE,
        # the floor, plus what the streaming stage keeps per row (README, "Data at any size")
        mem_mb=follows_data(config, RESOURCES["cpu_mem_mb"], ("data", "test"), 2.0),
        runtime=RESOURCES["cpu_runtime"],
    params:
        args=stage_args(
            path=DATA.path,
            origin=DATA.origin,
            **pick(
                DATASET,
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
            **pick(DATASET, "test_path", "test_split"),
            max_seq_length=TRAINING["max_seq_length"],
        ),
    shell:
        "{resources.in_image}python {input.script} {params.args} --model-json {input.model}"
        " --train-out {output.train} --eval-out {output.eval} --report-out {output.report}"
        " --test-out {output.test} > {log} 2>&1"
