"""Deprecated: moved to :mod:`kronopt.app.ablate`. Importing this module warns and returns that one."""

import kronopt.app.ablate as _new
from kronopt._moved import alias

alias("kronopt.ablate", _new)
