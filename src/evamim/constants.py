"""Normalisation constants shared by the data pipeline, the teachers and the objectives (RGB, in [0, 1])."""

# OpenAI CLIP's normalisation: EVA's teachers were trained with it, so it is the student's default too.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
