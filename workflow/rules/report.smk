# Plots stage: the figures and pages that `snakemake --report` gathers (README, "Seeing a run"), made from the
# run's outputs once evaluate is done, and the evaluate part of the run's MLflow record when tracking.mlflow is on.
# On the host, like the summary: matplotlib and MLflow only, no training stack. One per run.


rule plots:
    input:
        unpack(lambda wildcards: report_inputs(of_run(wildcards))),
        script=script("plots"),
        code=code_inputs("plots"),
    output:
        overview=report(
            out(RUN, "report", "overview.html"),
            category="1. Overview",
            caption="../report/overview.rst",
            labels=run_labels(page="overview"),
        ),
        evaluation=report(
            out(RUN, "report", "evaluation.html"),
            category="2. Evaluation",
            caption="../report/evaluation.rst",
            labels=run_labels(page="base vs fine-tuned, answers"),
        ),
        curves=report(
            out(RUN, "report", "curves.png"),
            category="3. Training",
            caption="../report/curves.rst",
            labels=run_labels(figure="training curves"),
        ),
        resources=report(
            out(RUN, "report", "resources.png"),
            category="4. Resources",
            subcategory="usage over time",
            caption="../report/resources.rst",
            labels=run_labels(figure="resource use over time"),
        ),
        timings=report(
            out(RUN, "report", "timings.png"),
            category="4. Resources",
            subcategory="stage timings",
            caption="../report/timings.rst",
            labels=run_labels(figure="stage timings"),
        ),
        tokens=report(
            out(RUN, "report", "tokens.png"),
            category="5. Data",
            caption="../report/tokens.rst",
            labels=run_labels(figure="token lengths"),
        ),
        config=report(
            out(RUN, "report", "config.html"),
            category="6. Configuration",
            caption="../report/config.rst",
            labels=run_labels(page="effective configuration"),
        ),
    log:
        out(RUN, "logs", "plots.log"),
    conda:
        "../envs/finetune.yaml"
    resources:
        mem_mb=lambda wildcards: of_run(wildcards)["resources"]["cpu_mem_mb"],
        runtime=lambda wildcards: of_run(wildcards)["resources"]["cpu_runtime"],
    params:
        config=lambda wildcards: summary_config(of_run(wildcards)),
        # the run's directory: metrics/train.json's grandparent; the pages go next to overview.html
        run_dir=lambda wildcards, input: Path(input.train).parent.parent,
        out_dir=lambda wildcards, output: Path(output.overview).parent,
        # no `input` in `args`: Snakemake compares only params not derived from the files with the last run's
        args=lambda wildcards: stage_args(
            evaluate=of_run(wildcards)["evaluate"]["enabled"],
            mlflow=of_run(wildcards)["tracking"]["mlflow"],
            mlflow_experiment=of_run(wildcards)["tracking"]["experiment"],
        ),
        data=lambda wildcards, input: (
            f"--data-report {input.data}" if EXPERIMENT else ""
        ),
    shell:
        "python {input.script} {params.args} {params.data} --run-dir {params.run_dir} --config-json {params.config:q}"
        " --out-dir {params.out_dir} > {log} 2>&1"
