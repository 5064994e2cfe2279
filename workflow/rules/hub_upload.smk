# Hub upload stage (optional, hub_upload.repo_id): the adapter to repo_id and the merged model to repo_id-merged
# on the Hugging Face Hub, each with a generated model card (scripts/hub_upload.py; README, "Upload"). Files the
# Hub already holds are not sent again. It runs where Snakemake runs, with HF_TOKEN (or hub_upload.token_file)
# from there: compute nodes often have no route to the Hub, and the token never reaches a job script.


rule hub_upload:
    input:
        unpack(lambda wildcards: hub_upload_dirs(config)),
        manifest=out(config, "manifest.json"),
        model=out(config, "model", "model.json"),
        report=out(config, "data", "report.json"),
        evaluate=(
            [out(config, "metrics", "evaluate.json")] if EVALUATE["enabled"] else []
        ),
        script=script("hub_upload"),
        code=code_inputs("hub_upload"),
    output:
        record=out(config, "hub_upload.json"),
    log:
        out(config, "logs", "hub_upload.log"),
    benchmark:
        out(config, "benchmarks", "hub_upload.tsv")
    localrule: True
    conda:
        "../envs/finetune.yaml"
    resources:
        mem_mb=RESOURCES["cpu_mem_mb"],
        runtime=RESOURCES["cpu_runtime"],
    params:
        args=stage_args(
            repo_id=HUB_UPLOAD["repo_id"],
            **hub_upload_dirs(config),
            **pick(
                HUB_UPLOAD,
                "private",
                "revision",
                "commit_message",
                "token_file",
                "endpoint",
                "retries",
                "retry_wait_s",
            ),
        ),
        evaluate=lambda wildcards, input: (
            f"--evaluate {input.evaluate}" if input.evaluate else ""
        ),
    shell:
        "python {input.script} {params.args} --manifest {input.manifest} --model-json {input.model}"
        " --data-report {input.report} {params.evaluate} --record-out {output.record} > {log} 2>&1"
