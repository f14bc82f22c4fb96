"""Deprecated: moved to :mod:`kronopt.app.docs` (``python -m kronopt.app.docs --write``). Importing this module warns and returns that one."""

import kronopt.app.docs as _new
from kronopt._moved import alias

alias("kronopt.docs", _new, as_main=__name__ == "__main__")
