"""Export to experiment trackers (config key export): one job per configured tracker, once the tables and the
report are written; results/export/{tracker}.json says what it wrote. The trackers' stores are not outputs:
each export reads what its tracker holds and sends only what is new (src/ckpt_stability/export/)."""


# Local: an online tracker must be reachable, which a cluster's compute nodes often are not.
localrules:
    export,


rule export:
    input:
        plan="results/plan.json",
        scores="results/scores.parquet",
        tables=["results/tables/stability.csv", "results/tables/improvement.csv", "results/tables/pick.csv"],
        report="results/report/report.html",
        perplexity=perplexity_files(),
        targets=layout.TARGETS if FINETUNE else [],
    output:
        layout.EXPORT_RECEIPT,
    log:
        "logs/export/{tracker}.log",
    wildcard_constraints:
        tracker="|".join(EXPORT),
    conda:
        CPU_ENV
    params:
        tables=lambda wildcards, input: os.path.dirname(input.tables[0]),
        options=export_options,
    shell:
        "python -m ckpt_stability export {wildcards.tracker} --plan {input.plan:q} --scores {input.scores:q} --tables {params.tables:q}"
        " --report {input.report:q} {params.options} --receipt {output:q} > {log:q} 2>&1"
