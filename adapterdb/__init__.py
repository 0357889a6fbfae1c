"""AdapterDB: version control and continual merging for LoRA adapters."""

from adapterdb.adapter import Adapter, load_peft, save_peft
from adapterdb.errors import AdbError

__all__ = ["Adapter", "AdbError", "load_peft", "save_peft"]
__version__ = "0.1.0"
