# Upload stage (optional, upload.bucket): the merged model, the adapter and the manifest to an S3-protocol bucket
# (scripts/upload.py; README, "Upload"). Objects already there with the same sha256 are skipped, so a re-run sends
# only what changed. It runs where Snakemake runs: compute nodes often have no route to the store.


rule upload:
    input:
        dirs=lambda wildcards: upload_dirs(of_run(wildcards)),
        manifest=out(RUN, "manifest.json"),
        script=script("upload"),
        code=code_inputs("upload"),
    output:
        record=out(RUN, "upload.json"),
    log:
        out(RUN, "logs", "upload.log"),
    benchmark:
        out(RUN, "benchmarks", "upload.tsv")
    localrule: True
    conda:
        "../envs/finetune.yaml"
    resources:
        mem_mb=lambda wildcards: of_run(wildcards)["resources"]["cpu_mem_mb"],
        runtime=lambda wildcards: of_run(wildcards)["resources"]["cpu_runtime"],
    params:
        args=lambda wildcards: stage_args(
            bucket=of_run(wildcards)["upload"]["bucket"],
            dirs=upload_dirs(of_run(wildcards)),
            **pick(of_run(wildcards)["upload"], "endpoint", "region", "part_size_mb"),
        ),
    shell:
        "python {input.script} {params.args} --manifest {input.manifest} --record-out {output.record} > {log} 2>&1"
