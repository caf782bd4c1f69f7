"""Where the Hydra configs live (checkout or installed wheel), and a config resolver for folders."""

from pathlib import Path

from omegaconf import OmegaConf

#: The installed ``busi_mtl`` package folder.
PACKAGE_DIR: Path = Path(__file__).resolve().parents[1]
_SOURCE_CONF = PACKAGE_DIR.parents[1] / "conf"

#: ``conf/`` at the repository top level in a checkout (editable install); the copy shipped inside the
#: wheel (``busi_mtl/conf``) otherwise.
CONFIG_DIR: Path = _SOURCE_CONF if _SOURCE_CONF.is_dir() else PACKAGE_DIR / "conf"


def _mkdir(path: str) -> str:
    """``${mkdir:some/dir}`` creates the folder and returns its path: for files that configs point into
    before any job has run (the Optuna study database)."""
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


if not OmegaConf.has_resolver("mkdir"):
    OmegaConf.register_new_resolver("mkdir", _mkdir)
