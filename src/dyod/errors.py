"""Errors that carry a message meant for the user (the CLI prints them and exits with code 2)."""


class DyodError(Exception):
    """A problem with the user's input (file, flag, model, run folder), explained in the message."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message ("" for none): a library's long message, cut to what names the fault."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
