"""dnnlib: small, dependency-light helpers shared by every ddn script.

`EasyDict` carries configurations (`c.network_kwargs.class_name`, ...), and `util` holds the
name-based object construction, URL opening with a download cache and logging used by the CLIs.
"""

from . import util
from .util import EasyDict, make_cache_dir_path

__all__ = ['EasyDict', 'make_cache_dir_path', 'util']
