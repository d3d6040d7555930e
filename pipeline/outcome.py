"""How a run can end short of completing, as one-line exceptions the CLI prints."""


class JobStopped(RuntimeError):
    """The run was stopped on purpose (e.g. too many samples fail); the message says why."""


class JobIncomplete(RuntimeError):
    """The run ended with pairs not committed; the message says how many and why."""
