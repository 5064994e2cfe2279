# GPU preflight: report the GPUs, estimate the memory the job needs, choose the training strategy for the train
# job's GPUs (resources.nodes x resources.gpus), and refuse a job that will not fit.


rule preflight:
    input:
        model=out(config, "model", "model.json"),
        script=script("preflight"),
        code=code_inputs("preflight"),
        image=CONTAINER_IMAGE,
    output:
        out(config, "preflight.json"),
    log:
        out(config, "logs", "preflight.log"),
    conda:
        "../envs/finetune.yaml"
    resources:
        in_image=IN_IMAGE,
        mem_mb=RESOURCES["gpu_mem_mb"],
        runtime=10,
        gpu=RESOURCES["gpus"],
    params:
        args=stage_args(
            **pick(
                TRAINING,
                "quantization",
                "max_seq_length",
                "micro_batch_size",
                "gradient_checkpointing",
            ),
            **pick(TRAINING, "lora_r", "target_modules", "bf16"),
            **pick(TRAINING, "strategy", "cpu_offload", "zero_stage"),
            **pick(RESOURCES, "gpus", "nodes", "processes_per_node"),
            **pick(config["preflight"], "device", "cpu_max_params", "memory_fraction"),
        ),
    shell:
        "{resources.in_image}python {input.script} {params.args} --model-json {input.model} --output {output} > {log} 2>&1"
