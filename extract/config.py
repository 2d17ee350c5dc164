"""`ExtractConfig`: what one `extract-features` run does, shared by the runner, the teacher
stage (extract/teacher_stage.py) and the PCA fit, none of which imports another for it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mrmae.shared import cache_format as cf
from mrmae.shared.views import ViewConfig


@dataclass
class ExtractConfig:
    shards: list[str]
    out: str
    teacher: str
    views: ViewConfig = field(default_factory=ViewConfig)
    dtype: str = "int8"
    int8_group: int | None = cf.INT8_GROUP  # int8: channels per scale; None: one scale per token
    format: str = cf.DEFAULT_BACKEND  # the cache backend: a registered one's name (cf.backend_names())
    batch_size: int = 64
    device: str = "cpu"
    workers: int = 0
    strict: bool = False
    progress: bool = True
    views_from: str | None = None  # add a teacher: replay this cache's views (out = its targets/<name>)
    decode_on_device: bool = False  # decode (nvjpeg on CUDA) and render on `device` (extract/device_decode.py)
    # workers decode with PIL, `device` renders (batch_render: the same pixels, the same cache);
    # None: on when `device` is CUDA (and not decode_on_device). See `renders_on_device`.
    render_on_device: bool | None = None
    store_pixels: str | None = None  # also store each view at the student's size, in this codec (views.PIXEL_CODECS)
    pca: int | None = None  # store K PCA coefficients per token instead of the C-wide features
    pca_fit_views: int = 2048  # the basis is fitted on the first N views in input order

    @property
    def renders_on_device(self) -> bool:
        """Whether the main process renders PIL-decoded images on `device` (render_on_device,
        by default on CUDA only: on a CPU the workers' render is the same work, in parallel)."""
        if self.render_on_device is None:
            return torch.device(self.device).type == "cuda" and not self.decode_on_device
        return self.render_on_device

    @property
    def worker_work(self) -> str:
        """What the render workers do with a sample (extract/mapper.py, WORK): read its header
        (--decode-on-device), decode it (the device renders), or decode and render it."""
        return "header" if self.decode_on_device else "decode" if self.renders_on_device else "render"
