"""The students' encoders as timm models: what `mrmae export` writes, `finetune` trains and `eval` probes.

Registered with timm when `mrmae` is imported (`mrmae/__init__.py`), so after `import mrmae`

    timm.create_model("mrmae_convvit_base", pretrained=True, pretrained_cfg_overlay=dict(file=PATH))

builds the encoder and loads an `mrmae export` file strictly. Each student family registers
its encoders under its student names (`mrmae.train.students`: `@register_family`), without
decoder, mimic head or fusion:

- `mrmae_vit_{tiny,small,base,large,huge}_patch16`: timm's own VisionTransformer ([CLS]
  token, learnable-shaped pos-embed [1, 1+N, D] holding the student's sin-cos values,
  `global_pool='token'`; `students/vit.py`).
- `mrmae_convvit_{tiny,small,base,large,huge}`: `ConvViT`, the ConvMAE hybrid: two
  convolution stages, then transformer blocks on the 16x16-patch grid, no [CLS] token
  (`students/convvit.py`).

Their pretrained configs carry the preprocessing the students trained and are evaluated
with (ImageNet mean and std, bicubic, MAE's eval crop 224 of 256, i.e. crop_pct 0.875),
so `timm.data.resolve_data_config({}, model=m)` returns it. `num_classes` defaults to 0
(a backbone, which is what an export holds); pass `num_classes=N` for a new head.

This module only re-exports, for code written against it.
"""

from mrmae.train.students.convvit import CONVVIT_ARCHS, ConvViT, MaskedConvBlock, StridedEmbed  # noqa: F401
from mrmae.train.students.registry import EVAL_CROP_PCT, pretrained_cfg, registered_kwargs  # noqa: F401
from mrmae.train.students.vit import VIT_ARCHS  # noqa: F401
