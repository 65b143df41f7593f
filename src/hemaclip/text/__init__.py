"""Text side of hemaclip: attribute captions (and their parser) and prompt files."""

from hemaclip.text.captions import CAPTION_TEMPLATES, Caption, caption_records, caption_variants, parse_caption
from hemaclip.text.prompts import DATASET_CLASSES, PromptSet, build_prompts, fill_template, load_prompts

__all__ = [
    "CAPTION_TEMPLATES",
    "Caption",
    "caption_records",
    "caption_variants",
    "parse_caption",
    "DATASET_CLASSES",
    "PromptSet",
    "build_prompts",
    "fill_template",
    "load_prompts",
]
