"""The report: ``results/report/report.html``, one self-contained page, and its figures as PNG files
under ``figures/{run}/`` (and ``figures/indicators/``) beside it.

Per run the page shows, summary first: the steadiest method and window and how much the mean total
variation (MTV) dropped, the best checkpoint by each method; the score trajectories per task and per
category, and under them how far the weights move (weights.csv, where averages measured it); MTV and instability
against the window size; the scheme × window view (each method and window's overall score, MTV and instability
beside its lag behind the checkpoint); the stability and improvement tables (sortable); an example-level view of
the raw checkpoints. Then, across runs, the pretraining indicators (how well
each proxy orders the models by the target); and the settings that produced the results. Figures are
embedded as data URIs and the few lines of script are inline, so the page needs no network and no other
file.

Every comparison with raw uses the same tasks on both sides: ``prob`` covers the choice tasks only, so
its raw baseline is the raw checkpoints' mean over those tasks.
"""

from ckpt_stability.report.page import build_report

__all__ = ["build_report"]
