"""An example kronopt plugin: one inner rule, ``sign_momentum``, found through entry points.

Nothing here registers itself. The package declares
``sign_momentum = "kronopt_example_plugin.inner:SignMomentumInner"`` in the
``kronopt.inner_rules`` entry-point group; kronopt reads that from the installed
metadata and imports :mod:`kronopt_example_plugin.inner` only when a config asks
for ``type = "sign_momentum"``.
"""

__version__ = "0.1.0"
