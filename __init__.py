"""mrmae: MR-MAE pretraining with an offline teacher-feature cache.

Stage 1 (`mrmae.extract`) runs a frozen CLIP/DINO teacher once over augmented views and
writes a cache; stage 2 (`mrmae.train`) trains the student from it. `mrmae.shared` is the
contract both speak: view geometry and rendering, teacher specs, the cache format.

Importing mrmae registers the students' encoders with timm (`mrmae.train.students`), so
`timm.create_model("mrmae_convvit_base", pretrained=True, pretrained_cfg_overlay=dict(file=...))`
loads an `mrmae export` file. timm takes seconds to import, and the command line must not
wait for it: when timm is not imported yet, the registration runs right after it is.
"""

import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"


def _register_with_timm() -> None:
    try:
        import mrmae.train.students  # noqa: F401  (each family's @register_family registers its encoders)
    except Exception as e:  # never break `import timm` for the user; say why our models are missing
        warnings.warn(f"mrmae: the mrmae_* models are not registered with timm ({type(e).__name__}: {e})")


class _AfterTimmImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of `timm` so that, once timm's own
    import has finished, mrmae's models are registered. Used once, then removed."""

    def find_spec(self, name, path=None, target=None):
        if name != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_timm = spec.loader.exec_module

        def exec_then_register(module) -> None:
            exec_timm(module)
            _register_with_timm()

        spec.loader.exec_module = exec_then_register
        return spec


if "timm" in sys.modules:
    _register_with_timm()
elif not any(isinstance(f, _AfterTimmImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTimmImport())
