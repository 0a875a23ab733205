"""`utils.recordio`, the path users' scripts import (kept stable): the module is `utils.data.recordio`
(utils/data/recordio.py); this name is that same module object, so everything, patching included,
behaves as it does there."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("utils.data.recordio")
