# Summary stage: the manifest (sha256 of every artifact, key metrics) and training.env (effective config,
# secrets redacted), with a table at the end of the log.


rule summary:
    input:
        **summary_inputs(config),
        script=script("summary"),
    output:
        manifest=out(config, "manifest.json"),
        env=out(config, "training.env"),
    log:
        out(config, "logs", "summary.log"),
    conda:
        "../envs/finetune.yaml"
    resources:
        mem_mb=config["resources"]["cpu_mem_mb"],
        runtime=config["resources"]["cpu_runtime"],
    params:
        config=summary_config(config),
    shell:
        "python {input.script} --config-json {params.config:q}"
        " --manifest-out {output.manifest} --env-out {output.env} > {log} 2>&1"
