"""The exception types the command line turns into a clean one-line error."""


class InputError(Exception):
    """Bad input (checkpoint, task file, config, prediction file): the message names the file and the
    problem, and is shown to the user as is, without a traceback."""


class UnusableCheckpoint(InputError):
    """A checkpoint that can never be evaluated as it is: non-finite weights, an unsupported or corrupt
    weight file, tensors that do not match its run, a model that does not load. Deterministic and caused
    by that checkpoint alone, so the workflow records it as the model's outcome (with this message as the
    reason) instead of failing the job, and the other models go on. Transient failures (killed, out of
    memory, disk full) are never this: they fail the job, and a rerun retries it."""


def reported(error: InputError | OSError) -> tuple[int, str]:
    """The exit status and the one-line message that report ``error`` without a traceback: 2 for bad input;
    1 for a system error (a full disk, a vanished file), with the path and the reason."""
    if isinstance(error, InputError):
        return 2, str(error)
    where = f"{error.filename}: " if error.filename else ""
    return 1, f"{where}{error.strerror or error}"
