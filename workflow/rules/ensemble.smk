"""Checkpoint ensembles: results/predictions/{run}/{vote,prob}{n}/step{step}/{task}.parquet.

One job per window combines the raw predictions of its checkpoints for every task: a majority vote for
all tasks, and the mean of the choice probabilities for choice tasks (the ensemble methods and the tasks
each covers: ckpt_stability.methods). It reads prediction files only."""

if ENSEMBLE_METHODS:

    rule ensemble:
        input:
            window_raw_predictions,
        output:
            **{method: ensemble_outputs(method) for method in ENSEMBLE_METHODS},
        log:
            "logs/ensemble/{run}/n{n}/step{step}.log",
        conda:
            CPU_ENV
        params:
            # the window's member steps: a change of membership recombines it
            members=window_steps,
            member_dirs=window_raw_dirs,
            tasks=",".join(TASKS),
            outputs=lambda wildcards, output: " ".join(
                f"--{method}-dir {shlex.quote(os.path.dirname(output[method][0]))}"
                for method in ENSEMBLE_METHODS
                if output[method]
            ),
        shell:
            "python -m ckpt_stability ensemble {params.member_dirs:q} --tasks {params.tasks:q} {params.outputs}"
            " --meta run={wildcards.run:q} --meta window={wildcards.n} --meta step={wildcards.step}"
            " --meta members={params.members:q} > {log:q} 2>&1"
