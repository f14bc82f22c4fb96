"""Deprecated: moved to :mod:`kronopt.app.train`. Importing this module warns and returns that one."""

import kronopt.app.train as _new
from kronopt._moved import alias

alias("kronopt.train", _new)
