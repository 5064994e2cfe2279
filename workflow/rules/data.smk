# Data stage: read the dataset in any supported format, normalise, validate, split train/eval, and report.
# A dataset in a bucket (dataset.path s3://...) is fetched first, on the host that runs Snakemake (compute nodes
# often have no route to the store), into a cache named after the objects' ETags; a hub dataset (org/name) at the
# commit dataset.revision names, into the shared Hugging Face cache (DATA_INPUTS, common.smk).
# One preparation per (dataset settings, tokenizer): {dkey} is the run's name for a single run, else the content
# key (README, "Experiments").

if FETCH:

    rule fetch_dataset:
        input:
            script=script("fetch_dataset"),
            code=code_inputs("fetch_dataset"),
        output:
            # a hub dataset's snapshot lies in the shared Hugging Face cache, which Snakemake must not clean
            cache=directory(FETCH["output"]) if FETCH["kind"] == "s3" else [],
            record=FETCH["record"],
        log:
            f"{OUT}/{next(iter(DATAS))}/logs/fetch_dataset.log",
        benchmark:
            f"{OUT}/{next(iter(DATAS))}/benchmarks/fetch_dataset.tsv"
        localrule: True
        conda:
            "../envs/finetune.yaml"
        resources:
            mem_mb=RESOURCES["cpu_mem_mb"],
            runtime=RESOURCES["cpu_runtime"],
        params:
            args=stage_args(
                **{k: v for k, v in FETCH.items() if k not in ("kind", "record")},
                record_out=FETCH["record"],
            ),
        shell:
            "python {input.script} {params.args} > {log} 2>&1"


rule prepare_data:
    input:
        model=lambda wildcards: model_out(of_data(wildcards), "model.json"),
        data=lambda wildcards: data_of(of_data(wildcards)).inputs,
        origin=lambda wildcards: data_of(of_data(wildcards)).origin or [],
        test=prepare_data_test,
        script=script("prepare_data"),
        code=code_inputs("prepare_data"),
        image=CONTAINER_IMAGE,
    output:
        train=f"{OUT}/{{dkey}}/data/train.jsonl",
        eval=f"{OUT}/{{dkey}}/data/eval.jsonl",
        report=f"{OUT}/{{dkey}}/data/report.json",
        test=f"{OUT}/{{dkey}}/data/test.jsonl",
    log:
        f"{OUT}/{{dkey}}/logs/prepare_data.log",
    conda:
        "../envs/finetune.yaml"
    resources:
        in_image=IN_IMAGE,
        # the floor, plus what the streaming stage keeps per row (README, "Data at any size")
        mem_mb=lambda wildcards, input, attempt: follows_data(
            of_data(wildcards),
            of_data(wildcards)["resources"]["cpu_mem_mb"],
            ("data", "test"),
            2.0,
        )(wildcards, input, attempt),
        runtime=lambda wildcards: of_data(wildcards)["resources"]["cpu_runtime"],
    params:
        args=lambda wildcards: prepare_data_args(of_data(wildcards)),
    shell:
        "{resources.in_image}python {input.script} {params.args} --model-json {input.model}"
        " --train-out {output.train} --eval-out {output.eval} --report-out {output.report}"
        " --test-out {output.test} > {log} 2>&1"
