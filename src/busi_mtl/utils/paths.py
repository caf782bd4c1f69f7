"""Where the Hydra configs live, for a source checkout and for an installed wheel alike."""

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parents[1]
_SOURCE_CONF = _PACKAGE_DIR.parents[1] / "conf"

#: ``conf/`` at the repository top level in a checkout (editable install); the copy shipped inside the
#: wheel (``busi_mtl/conf``) otherwise.
CONFIG_DIR: Path = _SOURCE_CONF if _SOURCE_CONF.is_dir() else _PACKAGE_DIR / "conf"
