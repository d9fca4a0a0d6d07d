"""Moved: batch scoring lives in ``stlink.scoring`` (this name stays for old imports)."""
from stlink.scoring import *  # noqa: F401,F403
from stlink.scoring import __all__  # noqa: F401
