"""Deprecated: moved to :mod:`kronopt.app.fisher`. Importing this module warns and returns that one."""

import kronopt.app.fisher as _new
from kronopt._moved import alias

alias("kronopt.fisher", _new)
