"""Training/inference benchmark: ``python scripts/benchmark.py [--device cuda --precision bf16-mixed]``.

Thin wrapper around :mod:`busi_mtl.benchmark`; see ``--help`` and the README's Performance section.
"""

from busi_mtl.benchmark import main

if __name__ == "__main__":
    main()
