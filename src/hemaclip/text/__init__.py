"""Text side of hemaclip: attribute captions (and their parser), prompt files, optional paraphrasing."""

from hemaclip.text.captions import CAPTION_TEMPLATES, Caption, caption_records, caption_variants, parse_caption
from hemaclip.text.prompts import DATASET_CLASSES, PromptSet, build_prompts, fill_template, load_prompts
from hemaclip.text.verbalizer import (
    CallableVerbalizer,
    CheckedParaphrases,
    CommandVerbalizer,
    Verbalizer,
    VerbalizerError,
    checked_paraphrases,
)

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
    "CallableVerbalizer",
    "CheckedParaphrases",
    "CommandVerbalizer",
    "Verbalizer",
    "VerbalizerError",
    "checked_paraphrases",
]
