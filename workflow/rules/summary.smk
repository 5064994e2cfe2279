# Summary stage: the manifest (sha256 of every artifact, key metrics) and training.env (effective config,
# secrets redacted), with a table at the end of the log. One per run; in an experiment the manifest also lists
# the shared model and data the run used (../_shared/...).


rule summary:
    input:
        unpack(lambda wildcards: ARTIFACTS[wildcards.run]),
        script=script("summary"),
        code=code_inputs("summary"),
    output:
        manifest=out(RUN, "manifest.json"),
        env=out(RUN, "training.env"),
    log:
        out(RUN, "logs", "summary.log"),
    conda:
        "../envs/finetune.yaml"
    resources:
        mem_mb=lambda wildcards: of_run(wildcards)["resources"]["cpu_mem_mb"],
        runtime=lambda wildcards: of_run(wildcards)["resources"]["cpu_runtime"],
        # the workflow's commit, for the manifest; a resource: a new commit alone re-runs nothing
        commit=lambda wildcards: project_commit(),
    params:
        config=lambda wildcards: summary_config(of_run(wildcards)),
        # what the manifest lists: the files of these inputs (the run's targets) and training.env
        artifacts=lambda wildcards: stage_args(
            artifacts=list(ARTIFACTS[wildcards.run].values()),
            **(
                {"model_json": model_out(of_run(wildcards), "model.json")}
                if EXPERIMENT
                else {}
            ),
        ),
    shell:
        "python {input.script} --config-json {params.config:q} {params.artifacts}"
        " --manifest-out {output.manifest} --env-out {output.env} --workflow-commit {resources.commit}"
        " > {log} 2>&1"
