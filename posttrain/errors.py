"""The one exception type for problems in what the user gave us (files, records, config keys).

The CLI prints it as a single ``error: ...`` line and exits with status 2, without a traceback.
Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad user input. The message names the file, the line or record, and the field."""
