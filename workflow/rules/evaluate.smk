# Evaluate stage: the base and the fine-tuned model side by side on the test set (data/test.jsonl; when it is
# empty, the held-out eval rows): answer loss, both models' greedy answers scored per sample, label metrics for
# classification-style answers, optional lm-eval tasks; metrics JSON, per-sample JSONL and CSV, a text report.


rule evaluate:
    input:
        model=out(config, "model", "model.json"),
        finetuned=final_model(config),
        train=out(config, "data", "train.jsonl"),
        eval=out(config, "data", "eval.jsonl"),
        test=out(config, "data", "test.jsonl"),
        script=script("evaluate"),
        code=code_inputs("evaluate"),
        image=CONTAINER_IMAGE,
    output:
        metrics=out(config, "metrics", "evaluate.json"),
        samples=out(config, "eval", "samples.jsonl"),
        csv=out(config, "eval", "samples.csv"),
        report=out(config, "eval", "report.txt"),
    log:
        out(config, "logs", "evaluate.log"),
    benchmark:
        out(config, "benchmarks", "evaluate.tsv")
    conda:
        "../envs/finetune.yaml"
    resources:
        in_image=IN_IMAGE,
        mem_mb=scaled(config, RESOURCES["gpu_mem_mb"]),
        runtime=scaled(config, RESOURCES["gpu_runtime"]),
        gpu=RESOURCES["gpus"],
        # evaluate.engine vllm: vLLM's interpreter (rules/common.smk, EVALUATE_VLLM)
        vllm=EVALUATE_VLLM,
    params:
        args=stage_args(
            **pick(
                EVALUATE,
                "num_samples",
                "max_new_tokens",
                "batch_size",
                "labels",
                "max_detected_labels",
            ),
            **pick(EVALUATE, "lm_eval_tasks", "lm_eval_limit", "lm_eval_include_path"),
            merged=MERGE["merge_full_weights"],
            engine=EVALUATE_ENGINE,
            vllm_enforce_eager=config["serve_check"]["enforce_eager"],
        ),
    shell:
        "{resources.in_image}python {input.script} {params.args} --model-json {input.model} --finetuned {input.finetuned}"
        " --train-data {input.train} --eval-data {input.eval} --test-data {input.test}"
        " --metrics-out {output.metrics} --samples-out {output.samples} --samples-csv {output.csv}"
        " --report-out {output.report} --vllm={resources.vllm:q} > {log} 2>&1"
