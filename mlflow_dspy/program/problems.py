"""The one base class of the problems a user can fix: something the user gave is wrong.

A reference that names nothing, a data file with a bad line, a project table
with a wrong key, a model URI that is not one, a flag out of its range: each
raises a subclass of `UserProblem` whose message says, in one line, what is
wrong and where. The command line prints that line and exits 2, with no stack
trace (`mlflow_dspy/cli.py`, `main`); anything else is a bug and keeps its
traceback. It lives here, in the lowest room, so that every room can raise one.
"""

from __future__ import annotations


class UserProblem(ValueError):
    """Something the user gave is wrong; the message, one line, says what and where.

    Subclasses keep a name of their own (`ReferenceProblem`, `DataProblem`, ...) so that callers can
    tell them apart; the command line catches them all through this class.
    """
