"""The report: results/report/report.html (self-contained) and its figures under results/report/figures/."""


rule report:
    input:
        plan="results/plan.json",
        scores="results/scores.parquet",
        stability="results/tables/stability.csv",
        improvement="results/tables/improvement.csv",
        pick="results/tables/pick.csv",
        indicators="results/tables/indicators.csv",
        # read beside the other tables (--tables); header only when no average measured the weights
        weights=layout.WEIGHTS,
        settings="results/evaluation_settings.json",
        targets=layout.TARGETS if FINETUNE else [],
        # the example-level view reads the raw predictions of every step
        predictions=[file for name in RUNS for file in prediction_files(name, RAW.name, 1, PLAN.runs[name], TASKS)],
    output:
        report=report("results/report/report.html", caption="../report/report.rst", category="Report"),
        figures=report(
            directory("results/report/figures"),
            patterns=["{run}/{figure}.png"],
            caption="../report/figures.rst",
            category="Figures",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "{figure}"},
        ),
    log:
        "logs/report.log",
    conda:
        CPU_ENV
    params:
        tables=lambda wildcards, input: os.path.dirname(input.stability),
        targets=lambda wildcards, input: f"--targets {shlex.quote(input.targets)}" if input.targets else "",
    shell:
        "python -m ckpt_stability report --plan {input.plan:q} --scores {input.scores:q} --tables {params.tables:q}"
        " --settings {input.settings:q} {params.targets} --output {output.report:q} > {log:q} 2>&1"
