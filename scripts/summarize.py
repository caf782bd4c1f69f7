"""Summarise a multirun (CV folds, seeds, sweeps): ``python scripts/summarize.py outputs/multirun/<dir>``.

Thin wrapper around :mod:`busi_mtl.summarize`; see ``--help``.
"""

from busi_mtl.summarize import main

if __name__ == "__main__":
    main()
