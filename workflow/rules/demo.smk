"""The embedded demo: its shared data (with its fine-tuning task), then one pretraining run per model size (see README,
"Quick start")."""

if config.get("demo"):

    rule demo_data:
        output:
            tasks=expand(f"{DEMO_ROOT}/tasks/{{task}}.json", task=DEMO_TASK_NAMES),
            finetune=expand(f"{DEMO_ROOT}/finetune/{{split}}/{DEMO_FINETUNE_TASK}.json", split=["train", "test"]),
            heldout=f"{DEMO_ROOT}/heldout.txt",
            tokenizer=directory(f"{DEMO_ROOT}/tokenizer"),
        log:
            "logs/demo/data.log",
        conda:
            CPU_ENV
        params:
            root=lambda wildcards, output: os.path.dirname(output.heldout),
            demo=config["demo"],
        shell:
            "python -m ckpt_stability demo data --output {params.root:q} --seed {params.demo[seed]}"
            " --samples {params.demo[samples_per_task]} > {log:q} 2>&1"

    rule demo_pretrain:
        input:
            tokenizer=f"{DEMO_ROOT}/tokenizer",
        output:
            [directory(f"{DEMO_ROOT}/{{size}}/checkpoint-{step}") for step in demo_steps()],
        log:
            "logs/demo/pretrain_{size}.log",
        wildcard_constraints:
            size="|".join(DEMO_MODEL_SIZES),
        conda:
            CPU_ENV
        threads: config["demo"]["threads"]
        params:
            data=lambda wildcards, input: os.path.dirname(input.tokenizer),
            run_dir=lambda wildcards, output: os.path.dirname(output[0]),
            demo=config["demo"],
        shell:
            "python -m ckpt_stability demo train --data {params.data:q} --size {wildcards.size}"
            " --output {params.run_dir:q} --seed {params.demo[seed]} --steps {params.demo[train_steps]}"
            " --save-every {params.demo[save_every]} --threads {params.demo[threads]} > {log:q} 2>&1"
