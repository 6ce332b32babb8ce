"""Errors that carry a message meant for the user (the CLI prints them and exits with code 2)."""


class DyodError(Exception):
    """A problem with the user's input (file, flag, model, run folder), explained in the message."""
