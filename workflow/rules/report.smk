# Plots stage: the figures and pages that `snakemake --report` gathers (README, "Seeing a run"), made from the
# run's outputs once evaluate is done, and the evaluate part of the run's MLflow record when tracking.mlflow is on.
# On the host, like the summary: matplotlib and MLflow only, no training stack.


rule plots:
    input:
        **report_inputs(config),
        script=script("plots"),
        code=code_inputs("plots"),
    output:
        overview=report(
            out(config, "report", "overview.html"),
            category="1. Overview",
            caption="../report/overview.rst",
            labels={"page": "overview"},
        ),
        evaluation=report(
            out(config, "report", "evaluation.html"),
            category="2. Evaluation",
            caption="../report/evaluation.rst",
            labels={"page": "base vs fine-tuned, answers"},
        ),
        curves=report(
            out(config, "report", "curves.png"),
            category="3. Training",
            caption="../report/curves.rst",
            labels={"figure": "training curves"},
        ),
        resources=report(
            out(config, "report", "resources.png"),
            category="4. Resources",
            subcategory="usage over time",
            caption="../report/resources.rst",
            labels={"figure": "resource use over time"},
        ),
        timings=report(
            out(config, "report", "timings.png"),
            category="4. Resources",
            subcategory="stage timings",
            caption="../report/timings.rst",
            labels={"figure": "stage timings"},
        ),
        tokens=report(
            out(config, "report", "tokens.png"),
            category="5. Data",
            caption="../report/tokens.rst",
            labels={"figure": "token lengths"},
        ),
        config=report(
            out(config, "report", "config.html"),
            category="6. Configuration",
            caption="../report/config.rst",
            labels={"page": "effective configuration"},
        ),
    log:
        out(config, "logs", "plots.log"),
    conda:
        "../envs/finetune.yaml"
    resources:
        mem_mb=RESOURCES["cpu_mem_mb"],
        runtime=RESOURCES["cpu_runtime"],
    params:
        config=summary_config(config),
        # the run's directory: metrics/train.json's grandparent; the pages go next to overview.html
        run_dir=lambda wildcards, input: Path(input.train).parent.parent,
        out_dir=lambda wildcards, output: Path(output.overview).parent,
        args=stage_args(
            evaluate=EVALUATE["enabled"],
            mlflow=TRACKING["mlflow"],
            mlflow_experiment=TRACKING["experiment"],
        ),
    shell:
        "python {input.script} {params.args} --run-dir {params.run_dir} --config-json {params.config:q}"
        " --out-dir {params.out_dir} > {log} 2>&1"
