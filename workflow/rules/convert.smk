"""Conversion of checkpoints in a trainer's native format: results/converted/{run}/step{step}/, one Hugging Face
directory per checkpoint of a run that names a convert command. Temporary unless keep_converted is set: gone
once every average, evaluation and fine-tune that reads it is done; the conversions of each run's last
(largest window - 1) checkpoints are kept, for the windows of the checkpoints still to land."""

if CONVERTED_RUNS:

    rule convert:
        input:
            native_checkpoint,
        output:
            converted_output(layout.CONVERTED),
        log:
            "logs/convert/{run}/step{step}.log",
        wildcard_constraints:
            run="|".join(map(re.escape, CONVERTED_RUNS)),
        conda:
            CPU_ENV
        params:
            command=lambda wildcards: RUNS[wildcards.run].convert,
        shell:
            "python -m ckpt_stability convert --command {params.command:q} --run {wildcards.run:q}"
            " --step {wildcards.step} --output {output:q} {input:q} > {log:q} 2>&1"

    if trailing_converted_steps():

        use rule convert as convert_trailing with:
            output:
                directory(layout.CONVERTED),
            wildcard_constraints:
                run="|".join(map(re.escape, CONVERTED_RUNS)),
                step="|".join(map(str, trailing_converted_steps())),

        ruleorder: convert_trailing > convert
