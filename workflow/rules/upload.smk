# Upload stage (optional, upload.bucket): the merged model, the adapter and the manifest to an S3-protocol bucket
# (scripts/upload.py; README, "Upload"). Objects already there with the same sha256 are skipped, so a re-run sends
# only what changed. It runs where Snakemake runs: compute nodes often have no route to the store.


rule upload:
    input:
        dirs=upload_dirs(config),
        manifest=out(config, "manifest.json"),
        script=script("upload"),
        code=code_inputs("upload"),
    output:
        record=out(config, "upload.json"),
    log:
        out(config, "logs", "upload.log"),
    benchmark:
        out(config, "benchmarks", "upload.tsv")
    localrule: True
    conda:
        "../envs/finetune.yaml"
    resources:
        mem_mb=RESOURCES["cpu_mem_mb"],
        runtime=RESOURCES["cpu_runtime"],
    params:
        args=stage_args(
            bucket=UPLOAD["bucket"],
            dirs=upload_dirs(config),
            endpoint=UPLOAD["endpoint"],
            region=UPLOAD["region"],
            part_size_mb=UPLOAD["part_size_mb"],
        ),
    shell:
        "python {input.script} {params.args} --manifest {input.manifest} --record-out {output.record} > {log} 2>&1"
