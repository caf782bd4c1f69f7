"""Compare two CVs fold by fold: ``python scripts/compare.py CANDIDATE_CV REFERENCE_CV``.

Thin wrapper around :mod:`busi_mtl.compare`; see ``--help``.
"""

from busi_mtl.compare import main

if __name__ == "__main__":
    main()
