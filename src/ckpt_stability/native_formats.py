"""When a checkpoint in a trainer's native format is complete, so that a copy or a save in progress is never
converted (as a partly copied Hugging Face checkpoint is never evaluated: ``checkpoints``).

Each format's rule is what its trainer writes last, or removes last, when a save finishes (sources read at
pytorch/torchtitan@b5bcd76c, NVIDIA/Megatron-LM@d98e8a64, allenai/OLMo-core@fa6c5014,
Lightning-AI/litgpt@26857050, NVIDIA/NeMo@8cfedd72, huggingface/accelerate@16cb6eb8, torch 2.13.0):

* ``dcp`` (``torch.distributed.checkpoint``; torchtitan's ``step-N/``, accelerate's FSDP
  ``pytorch_model_fsdp_0/``): ``.metadata``, which ``FileSystemWriter.finish``
  (torch/distributed/checkpoint/filesystem.py) writes once every rank has written its data files, to
  ``.metadata.tmp`` renamed into place; torchtitan's own resume scan (components/checkpointer/dcp.py
  ``_find_load_step``) and accelerate's ``save_fsdp_model`` rely on it.
* ``megatron``: a ``torch_dist`` checkpoint (``iter_0001000/``) needs ``metadata.json``, which megatron-core's
  ``dist_checkpointing.save`` (core/dist_checkpointing/serialization.py, ``metadata_finalize_fn``) writes
  after the DCP ``.metadata``, "only if the checkpoint is complete", and ``.metadata`` itself (``common.pt``
  is not required: Megatron-LM no longer writes it since 2026-07). A legacy checkpoint
  (``mp_rank_*/model_optim_rng.pt``) has no marker of its own: each archive must be a whole zip archive. For
  both, where the run directory holds ``latest_checkpointed_iteration.txt``, which ``save_checkpoint``
  (training/checkpointing.py, ``iter_finalize_fn``) updates after the barrier that ends a save, an iteration
  past it is still being saved.
* ``olmo-core``: ``.metadata.json``, ``model_and_optim/.metadata``, ``train/rank0.pt`` and ``config.json``,
  OLMo-core's own test (train/checkpoint.py ``dir_is_checkpoint``) plus the training config that its
  ``ConfigSaverCallback`` writes after the save and its converter reads (not a Hugging Face config); or a
  model-only save's ``.metadata`` at the top.
* ``litgpt``: ``lit_model.pth``, a whole zip archive, and ``model_config.yaml``, which litgpt/pretrain.py's
  ``save_checkpoint`` writes last.
* ``nemo`` (NeMo 2): ``weights/metadata.json`` and ``context/io.json``, and no sibling ``<dir>-unfinished``:
  the marker that NeMo's ``ModelCheckpoint`` (lightning/pytorch/callbacks/model_checkpoint.py,
  ``UNFINISHED_CHECKPOINT_SUFFIX``) creates before a save and removes after it.

Nothing here imports torch: the workflow calls it while parsing the DAG.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

HF_FORMAT = "hf"
DCP_FORMAT = "dcp"
FORMATS = (HF_FORMAT, DCP_FORMAT, "megatron", "olmo-core", "litgpt", "nemo")
"""``runs.<name>.format``: how a run's checkpoints are judged complete (hf: ``checkpoints``)"""
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
NEMO_UNFINISHED = "-unfinished"


def native_incomplete_reason(directory: Path, native_format: str) -> str | None:
    """Why ``directory``, a checkpoint in ``native_format``, is not (yet) complete; None when it is."""
    directory = Path(directory)
    return _RULES[native_format](directory)


def _nonempty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _dcp(directory: Path) -> str | None:
    return _missing(directory, ".metadata")


def zip_archive_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole zip archive (torch.save's format): its central directory, written last,
    must be readable and every record must lie within the file."""
    if not _nonempty(path):
        return f"{path.name} is missing or empty"
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        return f"{path.name} is not a whole zip archive ({error}); it may still be being written"
    if not records or any(record.header_offset + record.compress_size > size for record in records):
        return f"{path.name} is truncated: a record lies past its end"
    return None


def _megatron(directory: Path) -> str | None:
    tracker = directory.parent / MEGATRON_TRACKER
    match = re.search(r"(\d+)$", directory.name)
    if match and _nonempty(tracker):
        latest = tracker.read_text(encoding="utf-8").strip()
        if latest.isdigit() and int(match.group(1)) > int(latest):
            return f"iteration {int(match.group(1))} is past {tracker.name}'s {latest}: still being saved"
    if (directory / "metadata.json").exists():
        return _missing(directory, "metadata.json", ".metadata")
    archives = sorted(directory.glob("mp_rank_*/model_optim_rng.pt"))
    if not archives:
        return ("neither metadata.json (torch_dist, written when the save is done) nor "
                "mp_rank_*/model_optim_rng.pt (legacy) is there")
    for archive in archives:
        problem = zip_archive_problem(archive)
        if problem is not None:
            return f"{archive.parent.name}/{problem}"
    return None


def _olmo_core(directory: Path) -> str | None:
    if _nonempty(directory / ".metadata"):
        return None  # a model-only save
    return _missing(directory, ".metadata.json", "model_and_optim/.metadata", "train/rank0.pt", "config.json")


def _litgpt(directory: Path) -> str | None:
    return zip_archive_problem(directory / "lit_model.pth") or _missing(directory, "model_config.yaml")


def _nemo(directory: Path) -> str | None:
    marker = directory.with_name(directory.name + NEMO_UNFINISHED)
    if marker.exists():
        return f"{marker.name} is there: NeMo is still saving it"
    return _missing(directory, "weights/metadata.json", "context/io.json")


def _missing(directory: Path, *names: str) -> str | None:
    """Which of ``names`` (files under ``directory``) is missing or empty: they are written at the end of a save."""
    missing = [name for name in names if not _nonempty(directory / name)]
    if missing:
        return f"{', '.join(missing)} missing or empty (written when the save is done)"
    return None


_RULES = {"dcp": _dcp, "megatron": _megatron, "olmo-core": _olmo_core, "litgpt": _litgpt, "nemo": _nemo}
