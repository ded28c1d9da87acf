"""Pretraining indicators: how well each proxy (1/PPL, raw and stabilised scores, weight movement, a learned
comparator) orders the models by a target: results/tables/indicators.csv. The perplexities come from the evaluate
jobs, the weight movement from the averages (rule weights)."""


rule indicators:
    input:
        plan="results/plan.json",
        scores="results/scores.parquet",
        perplexity=perplexity_files(),
        targets=indicator_targets(),
        weights=layout.WEIGHTS,
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
        " --weights {input.weights:q} --output {output.table:q} > {log:q} 2>&1"
