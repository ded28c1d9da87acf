"""Pretraining indicators: how well each proxy (1/PPL, raw and stabilised scores, a learned comparator)
orders the models by a target: results/tables/indicators.csv. The perplexities come from the evaluate jobs."""


rule indicators:
    input:
        plan="results/plan.json",
        scores="results/scores.parquet",
        perplexity=perplexity_files(),
        targets=indicator_targets(),
    output:
        table="results/tables/indicators.csv",
        markdown="results/tables/indicators.md",
    log:
        "logs/indicators.log",
    conda:
        CPU_ENV
    params:
        options=indicator_options,
    shell:
        "python -m ckpt_stability indicators --plan {input.plan:q} --scores {input.scores:q} {params.options}"
        " --output {output.table:q} > {log:q} 2>&1"
