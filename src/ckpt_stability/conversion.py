"""A trainer's native checkpoint turned into a Hugging Face directory by the user's converter, inside the workflow.

A run may name a ``convert`` command (``runs.<name>.convert``) with the fields ``{src}`` (the native
checkpoint), ``{out}`` (an empty directory the command must fill), ``{step}`` and ``{run}``; each field is
replaced by its shell-quoted value and the command runs under bash. Its result is put in place only when the
command exits 0 **and** the directory validates as a Hugging Face checkpoint: config.json loads, the weight
files are complete (``checkpoints.checkpoint_problem``), and the tensor names are those of the model that
config.json builds (on the meta device: nothing allocated; tied weights may be left out, as
``save_pretrained`` leaves them). A conversion that fails or does not validate is recorded as that
checkpoint's outcome (``outcomes``: an ``excluded.json`` holding the reason and the command's last stderr
lines), so that every job reading it records the model as excluded and the other checkpoints go on.

Conversion is linear per tensor (a renaming, a split or concatenation, a transposition), so averaging the
converted checkpoints equals converting their average, up to rounding: one conversion per checkpoint, never
one per window.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path

from ckpt_stability.atomic import atomic_directory
from ckpt_stability.errors import InputError, UnusableCheckpoint

log = logging.getLogger(__name__)

FIELDS = ("src", "out", "step", "run")
STDERR_LINES = 3
"""the converter's last non-empty stderr lines kept in the reason of a failed conversion (its log has them all)"""


def render_command(command: str, src: Path, out: Path, step: int, run: str) -> str:
    """The command with its fields replaced by their shell-quoted values."""
    values = {"src": str(src), "out": str(out), "step": str(step), "run": run}
    try:
        return command.format(**{name: shlex.quote(value) for name, value in values.items()})
    except (KeyError, IndexError, ValueError) as error:
        raise InputError(f"convert command {command!r}: unknown or malformed field {error} (fields: "
                         f"{', '.join('{' + name + '}' for name in FIELDS)})") from None


def converter_problem(command: str) -> str | None:
    """Why ``command`` cannot run here: its program (the first word) is not found; None when it is found."""
    try:
        words = shlex.split(command)
    except ValueError as error:
        return f"not a shell command ({error})"
    if not words:
        return "empty"
    program = words[0]
    if "{" in program:
        return None  # a field: known only per checkpoint
    found = Path(program).is_file() if "/" in program else shutil.which(program) is not None
    return None if found else f"its program {program!r} is not found" + ("" if "/" in program else " on PATH")


def validation_problem(directory: Path) -> str | None:
    """Why ``directory`` is not a usable Hugging Face checkpoint, or None (see the module docstring)."""
    from ckpt_stability.checkpoints import checkpoint_problem, read_checkpoint_headers

    problem = checkpoint_problem(directory)
    if problem is not None:
        return problem.reason
    try:
        present = set(read_checkpoint_headers(directory))
    except UnusableCheckpoint as error:
        return str(error)
    return tensor_names_problem(present, directory)


def tensor_names_problem(present: set[str], config_dir: Path) -> str | None:
    """Why the tensor names ``present`` are not those of the model that ``config_dir``'s config.json builds
    (tied weights may be left out), or None."""
    expected, tied = expected_tensors(config_dir)
    missing = sorted(expected - present - tied)
    unexpected = sorted(present - expected)
    if missing or unexpected:
        return ("its tensors are not those of the model its config.json builds: "
                + "; ".join(f"{label} {', '.join(names[:5])}{' ...' if len(names) > 5 else ''} ({len(names)})"
                            for label, names in (("missing", missing), ("unexpected", unexpected)) if names))
    return None


def expected_tensors(directory: Path) -> tuple[set[str], set[str]]:
    """The state dict's names of the model that ``directory``'s config.json builds, built on the meta device,
    and those of them that are tied to another (``save_pretrained`` may leave them out)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = model.state_dict(keep_vars=True)  # tied weights are one Parameter under two names
    first_name = {}
    tied = {name for name, tensor in state.items() if first_name.setdefault(id(tensor), name) != name}
    return set(state), tied


class _NotConverted(Exception):
    """Raised inside the output's temporary directory so that it is discarded; carries the reason."""


def convert(command: str | None, source: Path, output: Path, step: int, run: str, *,
            assets: Path | None = None) -> None:
    """Run the converter on ``source`` into a temporary directory and put the result at ``output`` once it
    validates; otherwise record at ``output`` why the checkpoint was not converted (``outcomes``). With no
    command, ``source`` is a torch.distributed checkpoint with Hugging Face names, written as safetensors
    beside ``assets``' config.json and tokenizer by this package (``averaging.write_mean`` of one member)."""
    from ckpt_stability.averaging import write_mean
    from ckpt_stability.outcomes import write_excluded_directory

    output = Path(output)
    try:
        with atomic_directory(output) as scratch:
            if command is None:
                log.info("run %s, step %d: %s read in place, with the config.json and tokenizer of %s", run, step,
                         source, assets)
                try:
                    write_mean([Path(source)], scratch, steps=[step], assets=assets)
                except UnusableCheckpoint as error:
                    raise _NotConverted(f"not readable: {error}") from None
            else:
                rendered = render_command(command, Path(source).resolve(), scratch.resolve(), step, run)
                log.info("run %s, step %d: %s", run, step, rendered)
                returncode, tail = _run(rendered)
                if returncode != 0:
                    raise _NotConverted(f"the conversion failed (exit status {returncode}): {tail}")
            problem = validation_problem(scratch)
            if problem is not None:
                raise _NotConverted(f"the conversion's output is not a usable Hugging Face checkpoint: {problem}")
    except _NotConverted as error:
        write_excluded_directory(output, f"{source}: {error}")
        log.warning("%s: not converted: %s", source, error)
        return
    log.info("%s: converted from %s", output, source)


def _run(command: str) -> tuple[int, str]:
    """Run ``command`` under bash, its stdout and stderr passed on to this job's log; its exit status and its
    last STDERR_LINES stderr lines."""
    tail: deque[str] = deque(maxlen=STDERR_LINES)
    with subprocess.Popen(["bash", "-c", command], stdin=subprocess.DEVNULL, stdout=sys.stderr,
                          stderr=subprocess.PIPE, text=True, errors="replace") as process:
        for line in process.stderr:
            sys.stderr.write(line)
            if line.strip():
                tail.append(line.strip())
    return process.returncode, " | ".join(tail) or "(no output on stderr)"
