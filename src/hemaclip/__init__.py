"""hemaclip: morphology-aware image-text learning for blood-cell images (research software)."""

__version__ = "0.1.0"

# Checkpoint format version: bump when saved weights or config layout change incompatibly.
CHECKPOINT_FORMAT = 1
