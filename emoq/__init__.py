"""emoq: LLM-centric speech emotion recognition (EmoQ-Former soft prompts into LoRA LLMs).

After `import emoq`, the transformers Auto classes know emoq's models and processors:
`AutoModel.from_pretrained(folder)` and `AutoProcessor.from_pretrained(folder)` load a saved EmoQ,
Qieemo or Patamia model. The registration (which needs torch and transformers, several seconds to
import) happens when transformers is first imported, so commands that never touch a model (`emoq ls`,
`emoq validate`, audio decoding workers) stay fast.
"""

import importlib
import importlib.abc
import importlib.util
import logging
import sys

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    try:
        importlib.import_module("emoq.models")  # registers every model, config and processor on import
    except Exception as err:  # noqa: BLE001 - transformers itself must stay importable whatever happens here
        logging.getLogger("emoq").warning("emoq's classes are not registered with transformers: %s", err)


class _RegisterWhenTransformersLoads(importlib.abc.MetaPathFinder):
    """Finds nothing itself: whenever `transformers` is looked up, it lets the regular finders locate it and
    arranges for emoq's classes to be registered right after the package has actually loaded. It stays in
    place until then, since a lookup (`importlib.util.find_spec`) need not be followed by a load."""

    def __init__(self):
        self._looking = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers" or self._looking:
            return None
        self._looking = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._looking = False
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def load_then_register(module):
            load(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register_with_transformers()

        spec.loader.exec_module = load_then_register
        return spec


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(type(finder).__name__ == "_RegisterWhenTransformersLoads" for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTransformersLoads())
