"""The embedded default task: a small byte-level GPT trained on Python's own standard library.

Nothing here is needed by the optimizer itself; it is the workload of
``kronopt train`` and ``kronopt ablate`` (:mod:`kronopt.app.train`, :mod:`kronopt.app.ablate`).

* :mod:`kronopt.app.task.data` — the corpus (stdlib sources or any text file) and its split;
* :mod:`kronopt.app.task.model` — the language model (pure torch, named parameters).
"""

from .data import Corpus, load_corpus, stdlib_digest, stdlib_files
from .model import TinyGPT

__all__ = ["Corpus", "TinyGPT", "load_corpus", "stdlib_digest", "stdlib_files"]
