"""Few-shot inference: results/predictions/{run}/{raw,avg}{n}/step{step}/{task}.parquet, and the model's
perplexity on the held-out text (results/perplexity/{run}/{raw,avg}{n}/step{step}.json) when one is configured.

One job per model evaluates every configured task. With the engine on (config key engine), the job hands
its model to the evaluation engine of its slot, which keeps the previous model loaded and swaps the weights
in; engines end when idle, and when the workflow ends (below)."""


localrules:
    evaluation_settings,


rule evaluation_settings:
    input:
        # the task files: an edited one rewrites the settings, which re-evaluates every model (as an input
        # of this one job rather than of each evaluation, they keep the DAG of long runs small)
        task_files(),
    output:
        "results/evaluation_settings.json",
    log:
        "logs/evaluation_settings.log",
    conda:
        CPU_ENV
    params:
        settings=json.dumps(evaluation_settings(config["tasks"]), ensure_ascii=False),
    shell:
        "python -m ckpt_stability write-json --output {output:q} {params.settings:q} > {log:q} 2>&1"


rule evaluate:
    input:
        **perplexity_input(),
        model=model_dir,
        settings="results/evaluation_settings.json",
    output:
        **perplexity_output(),
        predictions=[layout.predictions(task=task) for task in TASKS],
    log:
        "logs/evaluate/{run}/{method}{n}/step{step}.log",
    wildcard_constraints:
        method=evaluated_methods(),
    group:
        "average_and_evaluate"
    conda:
        GPU_ENV if INFERENCE_ON_GPU else CPU_ENV
    threads: 1
    resources:
        gpu=1 if INFERENCE_ON_GPU else 0,
        # the job's model goes through one evaluation engine (profiles/slurm: one per Slurm job)
        engine=1,
    # the engine's settings reach the job through the environment (common.smk, set_engine_environment), not
    # as a param: the engine changes no result, so changing its settings re-evaluates nothing
    params:
        **inference_params(),
        # the members of an averaged model: a change of membership re-evaluates it
        members=window_steps,
        perplexity=perplexity_options,
    shell:
        f"{EVALUATE_COMMAND} --meta members={{params.members:q}} {{params.perplexity}} > {{log:q}} 2>&1"


onsuccess:
    end_engines()


onerror:
    end_engines()
