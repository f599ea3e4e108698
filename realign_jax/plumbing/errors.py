"""User-facing errors.

Binaries catch `UserError` at the top level, print its message as ONE line
(`error: ...`) on stderr and exit with status 2. Library code raises it for
bad input (missing files, malformed rows, inconsistent configs) with a message
that names what was wrong and where. Bugs stay ordinary exceptions.
"""


class UserError(Exception):
  """Bad input or configuration; the message is shown to the user verbatim."""

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split()))


# NOTE: the trainer raises it after a SIGTERM-triggered checkpoint; the binaries'
# `gin_utils.run_main` turns it into this exit status (a preempted job, resumable).
PREEMPTED_EXIT_CODE = 143


class Preempted(Exception):
  """Raised after a SIGTERM-triggered checkpoint; binaries exit with 143."""
