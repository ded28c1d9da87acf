# Checkpoint stability workflow: see README.md. This file only wires the stages together.

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


try:
    validate(config, "workflow/schemas/config.schema.yaml")
except WorkflowError as error:  # name the file and the key that hold the mistake
    mistake = error.__context__  # the jsonschema ValidationError it was raised from
    files = workflow.overwrite_configfiles or workflow.configfiles  # --configfile replaces the default
    key = mistake.json_path.removeprefix("$").removeprefix(".") or "top level"
    raise WorkflowError(f"Invalid config in {', '.join(map(str, files))}: {key}: {mistake.message}") from None


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/average.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/ensemble.smk"
include: "workflow/rules/stability.smk"
include: "workflow/rules/indicators.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        final_targets(),
