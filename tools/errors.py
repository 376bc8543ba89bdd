"""The one exception the command line turns into a one-line message and an exit code."""


class UserError(Exception):
    """Bad input or a refused action: printed as `bugforge: <message>`, no traceback."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
