"""Teacher specs and the frozen teachers that produce mimic targets.

A spec is `KIND:ARCH[@WEIGHTS]`. Each kind is one module of this package that registers a
`Teacher` subclass with `@register_teacher("KIND")` (`clip.py`: open_clip, `dino.py`: timm);
every module here is imported with the package, so a new kind is one new file and nothing
else: the spec parser, `build_teacher` and the cache manifest's check of `teacher.family`
read the registry. A kind defined outside the package registers when its module is imported.
What a teacher returns and the shared pieces: `base.py`.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (STUDENT_GRID, Teacher, TeacherError, TeacherOutput, TeacherSpec, build_teacher, load_weights_file,
                   random_init_warning, register_teacher, save_weights, state_dict_sha256, teacher_class,
                   teacher_kinds)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

from .clip import ClipTeacher  # noqa: E402  (already imported above; named here as before)
from .dino import TimmTeacher  # noqa: E402

__all__ = ["STUDENT_GRID", "ClipTeacher", "Teacher", "TeacherError", "TeacherOutput", "TeacherSpec", "TimmTeacher",
           "build_teacher", "load_weights_file", "random_init_warning", "register_teacher", "save_weights",
           "state_dict_sha256",
           "teacher_class", "teacher_kinds"]
