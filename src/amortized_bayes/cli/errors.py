"""The command line's user errors (see the policy in ``amortized_bayes.cli``)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake of the user's (a missing folder, an argument out of range): one line, exit 2."""
