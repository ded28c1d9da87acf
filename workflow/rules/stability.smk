"""Reductions: results/scores.parquet, results/tables/{stability,improvement,excluded,pick}.{csv,md},
pick_checkpoints.parquet and weights.csv."""


localrules:
    plan,


rule plan:
    output:
        "results/plan.json",
    log:
        "logs/plan.log",
    conda:
        CPU_ENV
    params:
        plan=json.dumps(dataclasses.asdict(PLAN), ensure_ascii=False),
    shell:
        "python -m ckpt_stability write-json --output {output:q} {params.plan:q} > {log:q} 2>&1"


rule scores:
    input:
        plan="results/plan.json",
        predictions=all_prediction_files(),
    output:
        "results/scores.parquet",
    log:
        "logs/scores.log",
    conda:
        CPU_ENV
    shell:
        "python -m ckpt_stability scores --plan {input.plan:q} --output {output:q} > {log:q} 2>&1"


# stability also reads the prediction files of each run's final segment (example-level metrics) without
# declaring them: declaring them would add as many edges to the DAG as scores has, for no gain, since
# scores declares every prediction file and stability depends on scores, so that a changed prediction
# file reruns both. tests/test_workflow.py guards this: stability reads no file that scores does not declare.
rule stability:
    input:
        plan="results/plan.json",
        scores="results/scores.parquet",
    output:
        stability="results/tables/stability.csv",
        stability_md="results/tables/stability.md",
        improvement="results/tables/improvement.csv",
        improvement_md="results/tables/improvement.md",
        excluded="results/tables/excluded.csv",
        excluded_md="results/tables/excluded.md",
    log:
        "logs/stability.log",
    conda:
        CPU_ENV
    params:
        output_dir=lambda wildcards, output: os.path.dirname(output.stability),
    shell:
        "python -m ckpt_stability stability --plan {input.plan:q} --scores {input.scores:q}"
        " --output-dir {params.output_dir:q} > {log:q} 2>&1"


# pick reads the prediction files of every step without declaring them, as stability does (above).
rule pick:
    input:
        plan="results/plan.json",
        scores="results/scores.parquet",
    output:
        table="results/tables/pick.csv",
        markdown="results/tables/pick.md",
        checkpoints="results/tables/pick_checkpoints.parquet",
    log:
        "logs/pick.log",
    conda:
        CPU_ENV
    params:
        pick_range=config["pick"]["range"],
    shell:
        "python -m ckpt_stability pick --plan {input.plan:q} --scores {input.scores:q} --range {params.pick_range}"
        " --output {output.table:q} --checkpoints {output.checkpoints:q} > {log:q} 2>&1"


rule weights:
    input:
        plan="results/plan.json",
        distances=weight_distance_files(),
    output:
        layout.WEIGHTS,
    log:
        "logs/weights.log",
    conda:
        CPU_ENV
    shell:
        "python -m ckpt_stability weights --plan {input.plan:q} --output {output:q} > {log:q} 2>&1"
