"""AdapterDB: version control and continual merging for LoRA adapters.

`import adapterdb as adb` gives the Python API (`adb.init`, `adb.open`, `adb.merge`, ...;
see `adapterdb.api`). Its names are imported on first use, so importing the package stays
cheap: neither torch nor the store loads until something needs them.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from adapterdb.adapter import Adapter, load_peft, save_peft
from adapterdb.errors import AdbError

if TYPE_CHECKING:
    from adapterdb.api import AdbWarning, CommitRecord, Store, init, load, merge, methods, open
    from adapterdb.integrations import Aligner, PamCallback

__all__ = [
    "Adapter",
    "AdbError",
    "AdbWarning",
    "Aligner",
    "CommitRecord",
    "PamCallback",
    "Store",
    "init",
    "load",
    "load_peft",
    "merge",
    "methods",
    "open",
    "save_peft",
]
# name -> the module that defines it, imported when the name is first used
_LAZY = {name: "adapterdb.api" for name in __all__ if name not in globals()}
_LAZY.update(dict.fromkeys(("Aligner", "PamCallback"), "adapterdb.integrations"))
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
