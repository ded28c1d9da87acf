"""The optional fine-tuning stage (config key finetune): the selected checkpoints (and averaged models) are
fine-tuned (results/finetune/{run}/{method}{n}/step{step}/model, temporary unless finetune.keep), evaluated on
the target tasks (results/finetune/{run}/{method}{n}/step{step}/{task}.parquet) and reduced to the indicators'
target, results/tables/targets.csv."""

if FINETUNE:

    localrules:
        finetune_evaluation_settings,

    rule finetune_evaluation_settings:
        input:
            [task_path(task) for task in FINETUNE["tasks"].values()],
        output:
            f"{layout.FINETUNE_DIR}/evaluation_settings.json",
        log:
            "logs/finetune/evaluation_settings.log",
        conda:
            CPU_ENV
        params:
            settings=json.dumps(evaluation_settings(FINETUNE["tasks"]), ensure_ascii=False),
        shell:
            "python -m ckpt_stability write-json --output {output:q} {params.settings:q} > {log:q} 2>&1"

    rule finetune:
        input:
            model=model_dir,
            data=FINETUNE["data"],
        output:
            model=finetuned_output(layout.FINETUNED_MODEL),
            record=layout.FINETUNE_RECORD,
        log:
            "logs/finetune/{run}/{method}{n}/step{step}.log",
        wildcard_constraints:
            method=evaluated_methods(),
        conda:
            GPU_ENV if INFERENCE_ON_GPU else CPU_ENV
        threads: FINETUNE["threads"]
        resources:
            gpu=1 if GPUS else 0,
        params:
            # the recipe and the prompt layout: a change re-fine-tunes; the members: a new average does
            options=finetune_options(),
            members=window_steps,
        shell:
            "python -m ckpt_stability finetune --model {input.model:q} --data {input.data:q}"
            " --output {output.model:q} --record {output.record:q} --threads {threads} --record-unusable"
            " --meta run={wildcards.run:q} --meta method={wildcards.method} --meta window={wildcards.n}"
            " --meta step={wildcards.step} --meta members={params.members:q} {params.options} > {log:q} 2>&1"

    rule evaluate_finetuned:
        input:
            model=layout.FINETUNED_MODEL,
            settings=f"{layout.FINETUNE_DIR}/evaluation_settings.json",
        output:
            predictions=[layout.predictions(layout.FINETUNE_DIR, task=task) for task in FINETUNE["tasks"]],
        log:
            "logs/finetune/{run}/{method}{n}/step{step}.evaluate.log",
        wildcard_constraints:
            method=evaluated_methods(),
        conda:
            GPU_ENV if INFERENCE_ON_GPU else CPU_ENV
        threads: 1
        resources:
            gpu=1 if INFERENCE_ON_GPU else 0,
            engine=1,
        params:
            **inference_params(),
        shell:
            f"{EVALUATE_COMMAND} --meta stage=finetune > {{log:q}} 2>&1"

    rule targets:
        input:
            settings=f"{layout.FINETUNE_DIR}/evaluation_settings.json",
            records=finetune_records(),
            predictions=finetuned_prediction_files(),
        output:
            table=layout.TARGETS,
            markdown=layout.TARGETS.replace(".csv", ".md"),
        log:
            "logs/targets.log",
        conda:
            CPU_ENV
        shell:
            "python -m ckpt_stability targets --settings {input.settings:q} --output {output.table:q}"
            " {input.records:q} > {log:q} 2>&1"
