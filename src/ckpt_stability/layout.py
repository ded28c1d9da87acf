"""The output layout (README, "Outputs"): where every file of the workflow goes.

Each path is a ``str.format`` template whose fields are the workflow's wildcards (``{run}``,
``{method}``, ``{n}``, ``{step}``, ``{task}``), so that the rules use it as a Snakemake pattern and the
package formats it. ``fill`` fills some fields and leaves the others as wildcards.
"""

from __future__ import annotations

RESULTS = "results"
PREDICTIONS_DIR = f"{RESULTS}/predictions"
PREDICTIONS = "{run}/{method}{n}/step{step}/{task}.parquet"
"""A model's or an ensemble's predictions on a task, under a predictions directory (PREDICTIONS_DIR)."""
PERPLEXITY_DIR = f"{RESULTS}/perplexity"
PERPLEXITY = "{run}/{method}{n}/step{step}.json"
"""A model's perplexity on the held-out text, under a perplexity directory (PERPLEXITY_DIR)."""
AVERAGED = f"{RESULTS}/averaged/{{run}}/{{method}}{{n}}/step{{step}}"
"""An averaged model (a Hugging Face directory)."""
WEIGHT_DISTANCES = f"{RESULTS}/weights/{{run}}/{{method}}{{n}}/step{{step}}.json"
"""What an average measured of its members' weights while it read them (``weight_movement``)."""
WEIGHTS = f"{RESULTS}/tables/weights.csv"
"""The weight-distance table, gathered from the averages' WEIGHT_DISTANCES."""
AVERAGING_PROVENANCE = "averaging.json"
"""In an averaged model's directory: its members, their steps and coefficients, the definition (``averaging``)."""
CONVERTED = f"{RESULTS}/converted/{{run}}/step{{step}}"
"""A checkpoint of a run in a trainer's native format, converted to a Hugging Face directory."""
FINETUNE_DIR = f"{RESULTS}/finetune"
"""The fine-tuned models' predictions on the target tasks, in the PREDICTIONS layout, beside each model's
fine-tuning record (FINETUNE_RECORD) and the fine-tuned model itself (FINETUNED_MODEL)."""
FINETUNED_MODEL = f"{FINETUNE_DIR}/{{run}}/{{method}}{{n}}/step{{step}}/model"
FINETUNE_RECORD = f"{FINETUNE_DIR}/{{run}}/{{method}}{{n}}/step{{step}}/finetune.json"
TARGETS = f"{RESULTS}/tables/targets.csv"
"""The fine-tuning outcome of every fine-tuned model: the indicators' target."""
SCORES = f"{RESULTS}/scores.parquet"
TABLES_DIR = f"{RESULTS}/tables"
REPORT = f"{RESULTS}/report/report.html"
EXPORT_DIR = f"{RESULTS}/export"
"""The trackers' local stores by default (TensorBoard's logdir, W&B's offline runs, MLflow's database), and
what each export wrote: EXPORT_RECEIPT."""
EXPORT_RECEIPT = f"{EXPORT_DIR}/{{tracker}}.json"


class _Wildcards(dict):
    def __missing__(self, field: str) -> str:
        return f"{{{field}}}"


def fill(template: str, **fields) -> str:
    """``template`` with ``fields`` filled in and every other field left as it is, a wildcard."""
    return template.format_map(_Wildcards(fields))


def predictions(root: str = PREDICTIONS_DIR, **fields) -> str:
    """The predictions pattern under ``root``, with ``fields`` filled in."""
    return fill(f"{root}/{PREDICTIONS}", **fields)


def perplexity(root: str = PERPLEXITY_DIR, **fields) -> str:
    """The perplexity pattern under ``root``, with ``fields`` filled in."""
    return fill(f"{root}/{PERPLEXITY}", **fields)
