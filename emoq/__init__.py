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
import sys

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    importlib.import_module("emoq.models")  # registers every model, config and processor on import


class _RegisterWhenTransformersLoads(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `transformers` is about to be imported, it lets the regular finders locate
    it and arranges for emoq's classes to be registered right after the package has loaded."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def load_then_register(module):
            load(module)
            _register_with_transformers()

        spec.loader.exec_module = load_then_register
        return spec


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(finder, _RegisterWhenTransformersLoads) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTransformersLoads())
