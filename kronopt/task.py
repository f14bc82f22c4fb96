"""Deprecated: moved to :mod:`kronopt.app.task`. Importing this module warns and returns that package."""

import sys

import kronopt.app.task as _new
import kronopt.app.task.data
import kronopt.app.task.model
from kronopt._moved import alias

sys.modules["kronopt.task.data"] = _new.data  # so that kronopt.task.data is not loaded a second time
sys.modules["kronopt.task.model"] = _new.model
alias("kronopt.task", _new)
