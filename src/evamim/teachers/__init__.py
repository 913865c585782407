"""Frozen teachers: student-normalised images (B, 3, H, W) -> patch targets (B, N, D).

Build one with ``create_teacher("open_clip:ViT-L-14-quickgelu/openai", student_grid=student.grid_size)``.
Backends (open_clip, transformers, timm) are imported only when a teacher of that kind is built.
"""

from evamim.teachers.base import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, Teacher, TokenEncoder
from evamim.teachers.errors import GridMismatchError, TeacherWeightsNotFoundError
from evamim.teachers.factory import BACKENDS, check_teacher, create_teacher, parse_spec

__all__ = [
    "BACKENDS",
    "CLIP_MEAN",
    "CLIP_STD",
    "GridMismatchError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Teacher",
    "TeacherWeightsNotFoundError",
    "TokenEncoder",
    "check_teacher",
    "create_teacher",
    "parse_spec",
]
