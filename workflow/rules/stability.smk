"""Reductions: results/scores.parquet and results/tables/{stability,improvement}.{csv,md}."""


localrules:
    plan,


rule plan:
    output:
        "results/plan.json",
    params:
        plan=dataclasses.asdict(PLAN),
    log:
        "logs/plan.log",
    run:
        write_json(output[0], params.plan)


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
        "python -m ckpt_stability scores --plan {input.plan} --output {output} > {log} 2>&1"


rule stability:
    input:
        plan="results/plan.json",
        scores="results/scores.parquet",
    output:
        stability="results/tables/stability.csv",
        stability_md="results/tables/stability.md",
        improvement="results/tables/improvement.csv",
        improvement_md="results/tables/improvement.md",
    params:
        output_dir=lambda wildcards, output: os.path.dirname(output.stability),
    log:
        "logs/stability.log",
    conda:
        CPU_ENV
    shell:
        "python -m ckpt_stability stability --plan {input.plan} --scores {input.scores}"
        " --output-dir {params.output_dir} > {log} 2>&1"
