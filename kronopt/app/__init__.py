"""The ``kronopt`` application: the command line, its embedded task and its instruments.

The library (``import kronopt``) never imports this subpackage; it depends on the
library and never the other way round. Modules:

* :mod:`kronopt.app.cli` — the parser and ``main`` (``kronopt ...``, ``python -m kronopt.app``);
* :mod:`kronopt.app.train`, :mod:`kronopt.app.ablate`, :mod:`kronopt.app.spectrum`,
  :mod:`kronopt.app.fisher` — one subcommand each;
* :mod:`kronopt.app.docs` — renders ``docs/stages.md``;
* :mod:`kronopt.app.task` — the embedded default task (data and model);
* :mod:`kronopt.app._args`, :mod:`kronopt.app._extras` — argument checking, optional dependencies.
"""
