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
