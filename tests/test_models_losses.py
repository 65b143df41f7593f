"""Contrastive and auxiliary losses: hand-computed values, reductions, gradients, 2-rank gathering."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from hemaclip.errors import HemaclipError
from hemaclip.models.losses import (
    SoftTargetLoss,
    aux_supervised_loss,
    build_loss,
    soft_cross_entropy,
)


def _features(n: int, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(n, d, generator=g), dim=-1)
    return img, txt


def _lse(values: list[float]) -> float:
    return math.log(sum(math.exp(v) for v in values))


def test_clip_loss_hand_computed() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = F.normalize(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), dim=-1)
    scale = 10.0
    sims = [[float(img[i] @ txt[j]) for j in range(2)] for i in range(2)]
    i2t = sum(_lse([scale * s for s in sims[i]]) - scale * sims[i][i] for i in range(2)) / 2
    t2i = sum(_lse([scale * sims[j][i] for j in range(2)]) - scale * sims[i][i] for i in range(2)) / 2
    loss = build_loss("clip")(img, txt, torch.tensor(scale))
    assert loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def test_build_loss_registry_errors() -> None:
    with pytest.raises(HemaclipError, match="unknown loss 'triplet'"):
        build_loss("triplet")
    with pytest.raises(HemaclipError, match="has no option"):
        build_loss("clip", target_scale=3.0)
    assert isinstance(build_loss("soft", target_scale=5.0), SoftTargetLoss)


def test_soft_targets_sum_to_one_and_hand_value() -> None:
    img, txt = _features(3)
    loss_fn = build_loss("soft", target_scale=4.0)
    targets = loss_fn.targets(img, txt, img, txt)
    assert torch.allclose(targets.sum(dim=1), torch.ones(3))
    scale = 7.0
    total = 0.0
    for i in range(3):  # both directions, by hand
        sims = [float((img[i] @ img[j] + txt[i] @ txt[j]) / 2) for j in range(3)]
        y = [math.exp(4.0 * s - _lse([4.0 * v for v in sims])) for s in sims]
        row_i = [scale * float(img[i] @ txt[j]) for j in range(3)]
        row_t = [scale * float(txt[i] @ img[j]) for j in range(3)]
        total += sum(-y[j] * (row_i[j] - _lse(row_i)) for j in range(3))
        total += sum(-y[j] * (row_t[j] - _lse(row_t)) for j in range(3))
    assert loss_fn(img, txt, torch.tensor(scale)).item() == pytest.approx(total / 6, rel=1e-5)


def test_soft_loss_reduces_to_infonce_for_identity_similarities() -> None:
    img = torch.eye(4)  # orthonormal: S_img = S_txt = I, so targets -> one-hot as target_scale grows
    txt = F.normalize(torch.eye(4) + 0.3 * torch.roll(torch.eye(4), 1, dims=1), dim=-1)
    soft = build_loss("soft", target_scale=100.0)
    assert torch.allclose(soft.targets(img, img, img, img), torch.eye(4), atol=1e-6)
    clip = build_loss("clip")(img, img, torch.tensor(5.0))
    assert soft(img, img, torch.tensor(5.0)).item() == pytest.approx(clip.item(), rel=1e-5)
    # with non-identity text sims the targets soften, so the loss differs from InfoNCE
    assert not torch.allclose(build_loss("soft", target_scale=3.0).targets(img, txt, img, txt), torch.eye(4), atol=1e-2)


def group_mask(groups: list[int]) -> torch.Tensor:
    """positive[i, j]: items i and j share a group (a negative group id is a group of one)."""
    g = torch.tensor(groups)
    return (g[:, None] == g[None, :]) & (g[:, None] >= 0) | torch.eye(len(groups), dtype=torch.bool)


def test_multipos_identity_mask_equals_infonce_and_hand_value() -> None:
    img, txt = _features(4)
    scale = torch.tensor(12.0)
    clip = build_loss("clip")(img, txt, scale)
    multipos = build_loss("multipos")
    assert multipos(img, txt, scale, positive=torch.eye(4, dtype=torch.bool)).item() == pytest.approx(clip.item(), rel=1e-6)
    assert multipos(img, txt, scale, positive=group_mask([-1, -1, -1, -1])).item() == pytest.approx(clip.item(), rel=1e-6)
    groups = [0, 0, 1, 2]
    logits = scale * img @ txt.T
    total = 0.0
    for mat in (logits, logits.T):
        for i in range(4):
            pos = [j for j in range(4) if groups[j] == groups[i]]
            lse = _lse([float(v) for v in mat[i]])
            total += sum(-(float(mat[i, j]) - lse) / len(pos) for j in pos)
    assert multipos(img, txt, scale, positive=group_mask(groups)).item() == pytest.approx(total / 8, rel=1e-5)
    with pytest.raises(ValueError, match="positive mask"):
        multipos(img, txt, scale)
    with pytest.raises(HemaclipError, match="no option"):
        build_loss("multipos", local_loss=True)  # the masks cover the whole batch: no local variant


@pytest.mark.parametrize("name", ["clip", "soft", "multipos"])
def test_gradients_flow(name: str) -> None:
    img, txt = _features(6)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    loss = build_loss(name)(img, txt, log_scale.exp(), positive=group_mask([0, 0, 1, 1, 2, 3]))
    loss.backward()
    for t in (img, txt, log_scale):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_soft_cross_entropy_matches_hard_ce() -> None:
    logits = torch.randn(5, 4)
    labels = torch.tensor([0, 3, 2, 1, 1])
    assert soft_cross_entropy(logits, F.one_hot(labels, 4).float()).item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-6
    )


def test_aux_loss_ignores_missing_labels() -> None:
    torch.manual_seed(0)
    attrs = {"cell_size": torch.randn(3, 2, requires_grad=True), "cell_shape": torch.randn(3, 2, requires_grad=True)}
    classes = torch.randn(3, 5, requires_grad=True)
    outputs = {"attribute_logits": attrs, "class_logits": classes}
    labels = torch.tensor([[0, -1], [1, 1], [-1, -1]])
    cls_labels = torch.tensor([4, -1, 2])
    expected = 0.5 * (
        F.cross_entropy(attrs["cell_size"][:2], labels[:2, 0])
        + F.cross_entropy(attrs["cell_shape"][1:2], labels[1:2, 1])
    ) + 2.0 * F.cross_entropy(classes[[0, 2]], cls_labels[[0, 2]])
    terms = aux_supervised_loss(outputs, labels, cls_labels, attribute_weight=0.5, class_weight=2.0)
    assert list(terms) == ["attribute_heads", "class_head"]  # named terms, each logged by the trainer
    assert terms["class_head"].item() == pytest.approx(2.0 * F.cross_entropy(classes[[0, 2]], cls_labels[[0, 2]]).item(), rel=1e-6)
    loss = sum(terms.values())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    as_dict = {"cell_size": labels[:, 0], "cell_shape": labels[:, 1]}
    assert sum(aux_supervised_loss(outputs, as_dict, cls_labels, 0.5, 2.0).values()).item() == pytest.approx(loss.item())
    assert list(aux_supervised_loss(outputs, labels, cls_labels, attribute_weight=0.0)) == ["class_head"]
    none = sum(aux_supervised_loss(outputs, torch.full((3, 2), -1), torch.full((3,), -1)).values())
    assert none.item() == 0.0
    none.backward()  # no NaN, graph intact
    assert torch.isfinite(classes.grad).all()
    with pytest.raises(HemaclipError, match="aux_heads"):
        aux_supervised_loss({"attribute_logits": None, "class_logits": None}, labels)


# ---------------------------------------------------------------- 2-rank gathering (gloo, CPU)

N, D = 8, 6
GROUPS = [0, 1, 0, 2, -1, 1, 3, -1]


def _full_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return _features(N, D, seed=3)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    img, txt = _full_batch()
    rows = slice(rank * N // world, (rank + 1) * N // world)
    results = {}
    for name in ("clip", "soft", "multipos"):
        for local in (False, True) if name != "multipos" else (False,):
            li = img[rows].clone().requires_grad_(True)
            lt = txt[rows].clone().requires_grad_(True)
            options = {"local_loss": local} if name != "multipos" else {}
            loss = build_loss(name, rank=rank, world_size=world, gather_with_grad=True, **options)
            value = loss(li, lt, torch.tensor(9.0), positive=group_mask(GROUPS))
            value.backward()
            results[(name, local)] = (value.item(), bool(torch.isfinite(li.grad).all() and li.grad.abs().sum() > 0))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_distributed_gather_matches_single_process(tmp_path) -> None:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    img, txt = _full_batch()
    for name in ("clip", "soft", "multipos"):
        full = build_loss(name)(img, txt, torch.tensor(9.0), positive=group_mask(GROUPS)).item()
        for r in ranks:
            assert r[(name, False)][0] == pytest.approx(full, rel=1e-5), name
            assert r[(name, False)][1] and (name == "multipos" or r[(name, True)][1])
        if name != "multipos":  # local losses score this rank's rows only; their mean over ranks is the full-batch loss
            assert sum(r[(name, True)][0] for r in ranks) / 2 == pytest.approx(full, rel=1e-5), name
