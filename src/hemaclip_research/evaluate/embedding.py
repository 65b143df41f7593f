"""Part: a 2-D map of the evaluated image embeddings and the class prompt embeddings."""

from __future__ import annotations

from typing import Any

import numpy as np

from hemaclip.data.attributes import ATTRIBUTE_NAMES, ATTRIBUTES
from hemaclip.errors import HemaclipError
from hemaclip_research import plots
from hemaclip_research.evaluate.inputs import EvalInputs, Figures, Part
from hemaclip_research.report import Section

__all__ = ["EMBED_MAX_POINTS", "embedding_part"]

EMBED_MAX_POINTS = 3000


def embedding_part(inputs: EvalInputs, figures: Figures) -> Part:
    """A 2-D map of up to EMBED_MAX_POINTS image embeddings (and the class prompt embeddings), by class
    and by one attribute."""
    from hemaclip.tasks.zero_shot import class_embeddings

    fs = inputs.eval_zero_shot_features if inputs.eval_zero_shot_features is not None else inputs.eval_features
    n = len(fs)
    if n < 2:
        return Part()
    rng = np.random.default_rng(inputs.seed)
    idx = np.sort(rng.choice(n, size=min(n, EMBED_MAX_POINTS), replace=False))
    feats = [fs.features[idx]]
    colours = [fs.labels[i] for i in idx]
    markers = ["image"] * len(idx)
    if inputs.model is not None:
        prompts = inputs.prompt_set.class_prompts(inputs.prompt_dataset)
        emb = class_embeddings(inputs.model, {c: prompts[c] for c in inputs.prompt_classes}, inputs.text_cache)
        feats.append(emb)
        colours += list(inputs.prompt_classes)
        markers += ["class prompt"] * len(inputs.prompt_classes)
    from threadpoolctl import threadpool_limits

    # One OpenMP thread: scikit-learn's t-SNE spins badly when its threads compete for busy cores
    # (seconds become minutes on a 2-core machine running anything else).
    with threadpool_limits(limits=1, user_api="openmp"):
        points, method = plots.embed_2d(np.concatenate(feats), method=inputs.embed_method, seed=inputs.seed)
    figs = [(plots.plot_embedding_map(points, colours, figures.path("embedding_map_class.png"),
                                      markers=markers, method=method, title="Image embeddings by class"),
             "2-D map of image embeddings (and class prompt embeddings), coloured by class.")]
    info: dict[str, Any] = {"method": method, "n_images": int(len(idx)),
                            "n_prompts": int(len(markers) - len(idx))}
    attr = inputs.map_attribute
    img_attrs = [fs.attributes[i] for i in idx]
    has = np.array([a is not None for a in img_attrs])
    if attr and has.any():
        if attr not in ATTRIBUTES:
            raise HemaclipError(f"unknown map attribute '{attr}'; choose from {', '.join(ATTRIBUTE_NAMES)}")
        sel = np.flatnonzero(has)
        values = [img_attrs[i][attr] for i in sel]
        figs.append((plots.plot_embedding_map(points[sel], values, figures.path(f"embedding_map_{attr}.png"),
                                              method=method, title=f"Image embeddings by {attr}"),
                     f"The same map, images only, coloured by {attr}."))
        info["attribute"] = attr
    return Part({"embedding_map": info}, [Section("Embedding map", f"{len(idx)} evaluated images ({method}).", [], figs)])


