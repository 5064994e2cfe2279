# Evaluate stage: the base and the fine-tuned model side by side on the test set (data/test.jsonl; when it is
# empty, the held-out eval rows): answer loss, both models' greedy answers scored per sample, label metrics for
# classification-style answers, optional lm-eval tasks; metrics JSON, per-sample JSONL and CSV, a text report.
# A single run evaluates both in one job. In an experiment the base model's part is shared (rule evaluate_base,
# one per base model, test set and evaluate settings: {bkey}) and each run's job evaluates its fine-tuned model
# against it (`--part finetuned`).


rule evaluate:
    input:
        unpack(evaluate_inputs),
        script=script("evaluate"),
        code=code_inputs("evaluate"),
        image=CONTAINER_IMAGE,
    output:
        metrics=out(RUN, "metrics", "evaluate.json"),
        samples=out(RUN, "eval", "samples.jsonl"),
        csv=out(RUN, "eval", "samples.csv"),
        report=out(RUN, "eval", "report.txt"),
    log:
        out(RUN, "logs", "evaluate.log"),
    benchmark:
        out(RUN, "benchmarks", "evaluate.tsv")
    conda:
        "../envs/finetune.yaml"
    resources:
        **gpu_resources(of_run),
        in_image=IN_IMAGE,
        # evaluate.engine vllm: vLLM's interpreter (rules/common.smk, ENGINE)
        vllm=lambda wildcards: ENGINE[wildcards.run][1],
    params:
        # no `input` in `args`: Snakemake compares only params that are not derived from the files with the
        # last run's (a changed setting re-runs the stage)
        args=lambda wildcards: evaluate_args(of_run(wildcards))
        + " "
        + engine_args(of_run(wildcards), ENGINE[wildcards.run]),
        # in an experiment the base side comes from rule evaluate_base
        part=lambda wildcards, input: (
            f"--part finetuned --base-metrics {input.base_metrics} --base-samples {input.base_samples}"
            if EXPERIMENT
            else ""
        ),
    shell:
        "{resources.in_image}python {input.script} {params.args} {params.part} --model-json {input.model}"
        " --finetuned {input.finetuned} --train-data {input.train} --eval-data {input.eval} --test-data {input.test}"
        " --metrics-out {output.metrics} --samples-out {output.samples} --samples-csv {output.csv}"
        " --report-out {output.report} --vllm={resources.vllm:q} > {log} 2>&1"


rule evaluate_base:
    input:
        model=lambda wildcards: model_out(of_base(wildcards), "model.json"),
        train=lambda wildcards: data_out(of_base(wildcards), "train.jsonl"),
        eval=lambda wildcards: data_out(of_base(wildcards), "eval.jsonl"),
        test=lambda wildcards: data_out(of_base(wildcards), "test.jsonl"),
        script=script("evaluate"),
        code=code_inputs("evaluate"),
        image=CONTAINER_IMAGE,
    output:
        metrics=f"{OUT}/{{bkey}}/eval/base.json",
        samples=f"{OUT}/{{bkey}}/eval/base.jsonl",
    log:
        f"{OUT}/{{bkey}}/logs/evaluate_base.log",
    benchmark:
        f"{OUT}/{{bkey}}/benchmarks/evaluate_base.tsv"
    conda:
        "../envs/finetune.yaml"
    resources:
        **gpu_resources(of_base),
        in_image=IN_IMAGE,
        vllm=lambda wildcards: BASE_ENGINE[wildcards.bkey][1],
    params:
        args=lambda wildcards: evaluate_args(of_base(wildcards), finetuned=False)
        + " "
        + engine_args(of_base(wildcards), BASE_ENGINE[wildcards.bkey]),
    shell:
        "{resources.in_image}python {input.script} {params.args} --part base --model-json {input.model}"
        " --train-data {input.train} --eval-data {input.eval} --test-data {input.test}"
        " --metrics-out {output.metrics} --samples-out {output.samples} --vllm={resources.vllm:q} > {log} 2>&1"
