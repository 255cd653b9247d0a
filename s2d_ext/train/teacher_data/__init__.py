"""Training data scored by the targets themselves, with no download: the running interpreter's standard
library source (no evaluation prompt), cut into windows, and every teacher's next-token distribution at
every position (teacher forcing: one batched forward per window and teacher, cheap on a CPU next to
generating answers), for distilling one draft toward several targets (SoFT, the paper's one draft for
several targets).

Cache: ``<root>/<name>/`` (``root`` = ``--cache-dir``, else ``$S2D_TEACHER_DATA_DIR``, else
``~/.cache/s2d_ext/teacher_data``), in the format of :mod:`s2d_ext.train.self_data` (so
:func:`~s2d_ext.train.self_data.load_self_data` loads it): shards written under a temporary name and
renamed into place, their SHA-256 recorded in ``progress.json``, ``manifest.json`` written last. An
interrupted build resumes at the first missing or damaged shard; a finished one is verified and reused.
Each shard's ``topk_ids`` / ``topk_logprobs`` are [positions, teachers, K]."""

from __future__ import annotations

from s2d_ext.train.teacher_data.build import (
    build_teacher_data,
    source_windows,
    stdlib_token_counts,
    teacher_topk,
)
from s2d_ext.train.teacher_data.spec import FORMAT_VERSION, TeacherDataSpec, teacher_data_dir

__all__ = [
    "FORMAT_VERSION",
    "TeacherDataSpec",
    "build_teacher_data",
    "source_windows",
    "stdlib_token_counts",
    "teacher_data_dir",
    "teacher_topk",
]
