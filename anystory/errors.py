"""The exception for bad user input, kept apart from programming errors.

``InvalidInputError`` is what a user can fix (a file, a mask, a number, a script); its message names the problem
and is shown as is. It subclasses ``ValueError`` so callers that catch ``ValueError`` keep working, while the app
can report these, and only these, as input errors and let every other exception surface as a bug.
"""


class InvalidInputError(ValueError):
    """Bad input from the user (image, mask, subject list, number, script); the message says what to fix."""
