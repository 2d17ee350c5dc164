"""The student families: each module of this package (`vit.py`, `convvit.py`) is one family,
registered with `@register_family`; the registry and its contract are `registry.py` (import
them from there). Every family module is imported with the package, so a new family is one
new file here, or an installed plug-in (entry-point group `mrmae.students`): `create_model`,
export, finetune, eval, checkpoint restore and timm's `mrmae_*` names read the registry.
"""

# timm first: its import registers this package's encoders (mrmae/__init__.py), which must
# not find a family module half-imported.
import timm  # noqa: F401

import importlib  # noqa: E402
import pkgutil  # noqa: E402

from mrmae.shared.plugins import load_plugins  # noqa: E402

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
load_plugins("mrmae.students")  # families installed outside mrmae (shared/plugins.py)
