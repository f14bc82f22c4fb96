"""Deprecated: moved to :mod:`kronopt.app.spectrum`. Importing this module warns and returns that one."""

import kronopt.app.spectrum as _new
from kronopt._moved import alias

alias("kronopt.spectrum", _new)
