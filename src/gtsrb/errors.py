"""The one exception type the CLI turns into a clear message and a non-zero exit."""


class GtsrbError(Exception):
    """A failure the user can act on: the message names the file, parameter or URL at fault."""


class ParamsError(GtsrbError):
    """params.yaml is missing a key, has an unknown key, or a value of the wrong type or range."""
