"""The one exception type users see.

Every refused input raises :class:`ContMergeError` with a message that names the offending input and
what to do about it. The CLI prints the message (no traceback) and exits with status 2; the Python
API lets it propagate. Refusals happen before anything is written.
"""

from __future__ import annotations


class ContMergeError(Exception):
    """A refused input or an impossible request, with a message meant for the user."""

    exit_code = 2
