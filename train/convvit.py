"""The ConvViT student, now the `convvit` family file `mrmae.train.students.convvit`; these
names stay importable from here for code written against this module."""

from mrmae.train.students.convvit import (CONVVIT_ARCHS, ConvViTConfig, MaskedConvBlock, MRConvViT,  # noqa: F401
                                          StridedEmbed)
