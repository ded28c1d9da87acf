"""The one exception type the command line turns into a clean one-line error."""


class InputError(Exception):
    """Bad input (checkpoint, task file, config, prediction file): the message names the file and the
    problem, and is shown to the user as is, without a traceback."""
