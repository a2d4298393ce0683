"""The one base class of every error caused by the user's input.

A config key, a file, a row, a model name or a parameter that cannot be used raises a
subclass of ``InputError`` whose message names it (one or two lines, with what would
fix it). The command line prints the message and exits 2, without a traceback; any
other exception is an internal error (exit 1, traceback, please report it).
"""
from __future__ import annotations


class InputError(ValueError):
    """The user's input (config, files, model names, parameters) cannot be used."""
