"""Reading weight pickles (``.pkl``: Detectron2 model zoo, Caffe2 / Detectron1) without running code.

A pickle names the functions that rebuild its objects, and ``pickle.load`` calls them: a crafted
``.pkl`` runs any code it likes (``os.system`` via ``__reduce__``). Weight files only need numpy
arrays, numbers, strings and containers, so :class:`WeightsUnpickler` rebuilds only those
(:data:`ALLOWED_GLOBALS`) and refuses every other global with an error naming the file and the
global, before anything of it is called.
"""
from __future__ import annotations

import pickle

__all__ = ["ALLOWED_GLOBALS", "WeightsUnpickler", "load_weights_pickle"]

# (module, name) of every global a weight pickle may reference: numpy arrays / scalars / dtypes
# (numpy 1 and numpy 2 module paths) and ordered dicts.
ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("collections", "OrderedDict"),
})


class WeightsUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`ALLOWED_GLOBALS`."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="latin1")  # Python-2 era Caffe2 pickles
        self.source = source

    def find_class(self, module, name):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"{self.source}: the pickle references '{module}.{name}', which a weight file does not need "
            "(only numpy arrays, numbers, strings and containers are read); refused without running it"
        )


def load_weights_pickle(path: str):
    """The object of the weight pickle ``path`` (dicts of numpy arrays and numbers).

    Raises:
        ValueError naming ``path`` for a refused global or an unreadable pickle.
    """
    with open(path, "rb") as f:
        try:
            return WeightsUnpickler(f, path).load()
        except pickle.UnpicklingError as e:
            raise ValueError(str(e) if str(e).startswith(path) else f"{path}: not a readable pickle ({e})") from None
        except (EOFError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
