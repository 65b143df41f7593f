"""Numbers several layers share, defined once (a leaf module: no imports, so any layer may use it)."""

# The per-channel RGB mean and standard deviation of ImageNet, which torchvision/timm image weights expect
# unless a model config says otherwise (its `image_mean`/`image_std`).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
