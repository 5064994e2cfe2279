# Summary stage: the manifest (sha256 of every artifact, key metrics) and training.env (effective config,
# secrets redacted), with a table at the end of the log.


rule summary:
    input:
        **summary_inputs(config),
        script=script("summary"),
        code=code_inputs("summary"),
    output:
        manifest=out(config, "manifest.json"),
        env=out(config, "training.env"),
    log:
        out(config, "logs", "summary.log"),
    conda:
        "../envs/finetune.yaml"
    resources:
        mem_mb=RESOURCES["cpu_mem_mb"],
        runtime=RESOURCES["cpu_runtime"],
        # the workflow's commit, for the manifest; a resource: a new commit alone re-runs nothing
        commit=lambda wildcards: project_commit(),
    params:
        config=summary_config(config),
        # what the manifest lists: the files of these inputs (the run's targets) and training.env
        artifacts=stage_args(artifacts=list(summary_inputs(config).values())),
    shell:
        "python {input.script} --config-json {params.config:q} {params.artifacts}"
        " --manifest-out {output.manifest} --env-out {output.env} --workflow-commit {resources.commit}"
        " > {log} 2>&1"
