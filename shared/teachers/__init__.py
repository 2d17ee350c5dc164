"""Teachers: the frozen models that produce mimic targets, one kind per module.

The contract and the registry are `base.py` (`Teacher`, `TeacherSpec`, `build_teacher`,
`register_teacher`, ...): import them from there. Each other module of this package is one
kind, registered with `@register_teacher("KIND")` (`clip.py`: open_clip, `dino.py`: timm),
and is imported with the package, so a new kind is one new file and nothing else: the spec
parser, `build_teacher` and the cache manifest's check of `teacher.family` read the
registry. A kind defined outside the package registers when its module is imported, by
hand or as an installed plug-in (entry-point group `mrmae.teachers`, shared/plugins.py).
"""

from __future__ import annotations

import importlib
import pkgutil

from mrmae.shared.plugins import load_plugins

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
load_plugins("mrmae.teachers")  # kinds installed outside mrmae (shared/plugins.py)
