# Hub upload stage (optional, hub_upload.repo_id): the adapter to repo_id and the merged model to repo_id-merged
# on the Hugging Face Hub, each with a generated model card (scripts/hub_upload.py; README, "Upload"). Files the
# Hub already holds are not sent again. It runs where Snakemake runs, with HF_TOKEN (or hub_upload.token_file)
# from there: compute nodes often have no route to the Hub, and the token never reaches a job script.


rule hub_upload:
    input:
        unpack(lambda wildcards: hub_upload_dirs(of_run(wildcards))),
        manifest=out(RUN, "manifest.json"),
        model=lambda wildcards: model_out(of_run(wildcards), "model.json"),
        report=lambda wildcards: data_out(of_run(wildcards), "report.json"),
        evaluate=lambda wildcards: (
            [out(of_run(wildcards), "metrics", "evaluate.json")]
            if of_run(wildcards)["evaluate"]["enabled"]
            else []
        ),
        script=script("hub_upload"),
        code=code_inputs("hub_upload"),
    output:
        record=out(RUN, "hub_upload.json"),
    log:
        out(RUN, "logs", "hub_upload.log"),
    benchmark:
        out(RUN, "benchmarks", "hub_upload.tsv")
    localrule: True
    conda:
        "../envs/finetune.yaml"
    resources:
        mem_mb=lambda wildcards: of_run(wildcards)["resources"]["cpu_mem_mb"],
        runtime=lambda wildcards: of_run(wildcards)["resources"]["cpu_runtime"],
    params:
        args=lambda wildcards: stage_args(
            repo_id=of_run(wildcards)["hub_upload"]["repo_id"],
            **hub_upload_dirs(of_run(wildcards)),
            **pick(
                of_run(wildcards)["hub_upload"],
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
