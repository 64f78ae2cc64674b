"""k-means initialisations: cluster recovery, seeding, degenerate inputs, and YOLOv2's published table."""

from __future__ import annotations

import pytest
import torch

from lightning_autoanchor.boxes import BoxSet
from lightning_autoanchor.clustering import initial_anchors, kmeans_iou, kmeans_log, kmeans_whitened
from lightning_autoanchor.errors import AnchorFitError
from lightning_autoanchor.metrics import average_iou
from lightning_autoanchor.optimizer import fit_anchors

CENTRES = torch.tensor([[12.0, 30.0], [80.0, 60.0], [300.0, 150.0]])


def blobs(n_per: int = 200, seed: int = 0) -> torch.Tensor:
    """Boxes scattered by 5 % (log-normal) around three well separated sizes."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([c * torch.exp(0.05 * torch.randn(n_per, 2, generator=gen)) for c in CENTRES])


def sort_by_area(c: torch.Tensor) -> torch.Tensor:
    return c[c.prod(1).argsort()]


@pytest.mark.parametrize("kmeans", [kmeans_log, kmeans_iou, kmeans_whitened])
def test_kmeans_finds_separated_clusters(kmeans) -> None:
    found = sort_by_area(kmeans(blobs(), 3, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(found, CENTRES, rtol=0.03, atol=0.0)


@pytest.mark.parametrize("kmeans", [kmeans_log, kmeans_iou, kmeans_whitened])
def test_kmeans_is_reproducible_from_its_generator(kmeans) -> None:
    wh = blobs() * torch.exp(0.4 * torch.randn(600, 2, generator=torch.Generator().manual_seed(5)))
    a = kmeans(wh, 5, generator=torch.Generator().manual_seed(1))
    b = kmeans(wh, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kmeans", [kmeans_log, kmeans_iou, kmeans_whitened])
def test_weights_act_as_repeated_boxes(kmeans) -> None:
    unique = torch.tensor([[10.0, 10.0], [11.0, 10.0], [100.0, 40.0], [90.0, 50.0]])
    counts = torch.tensor([30.0, 10.0, 5.0, 5.0])
    weighted = sort_by_area(kmeans(unique, 2, weights=counts, generator=torch.Generator().manual_seed(0)))
    assert weighted[0, 0] < 10.5  # pulled towards the heavy (10, 10)
    assert 90.0 <= weighted[1, 0] <= 100.0


@pytest.mark.parametrize("init", ["log", "iou", "euclidean"])
def test_fewer_distinct_boxes_than_centres_repeat_them(init: str) -> None:
    wh = torch.tensor([[20.0, 40.0]] * 10 + [[50.0, 50.0]] * 10)
    starts = initial_anchors(wh, 5, init, generator=torch.Generator().manual_seed(0), starts=2)  # type: ignore[arg-type]
    assert starts.shape == (2, 5, 2)
    assert torch.isfinite(starts).all() and (starts > 0).all()
    for row in starts.reshape(-1, 2):
        assert any(torch.allclose(row, box, rtol=1e-5) for box in wh.unique(dim=0))


def test_kmeans_refuses_empty_input_and_zero_centres() -> None:
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(AnchorFitError, match="non-empty"):
        kmeans_log(torch.zeros(0, 2), 3, generator=gen)
    with pytest.raises(AnchorFitError, match="at least 1"):
        kmeans_iou(blobs(), 0, generator=gen)
    with pytest.raises(AnchorFitError, match="init"):
        initial_anchors(blobs(), 3, "random", generator=gen)  # type: ignore[arg-type]


# YOLOv2 (Redmon & Farhadi 2017), Table 1: average IoU of VOC 2007 boxes, normalised by image size,
# with their closest of k centroids from 1 - IoU k-means: 61.0 at k = 5, 67.2 at k = 9.
def normalised(voc2007: BoxSet) -> torch.Tensor:
    return voc2007.scaled(1.0, resize="stretch")


def test_yolov2_table_k9(voc2007: BoxSet) -> None:
    wh = normalised(voc2007)
    for seed in range(3):
        centroids = kmeans_iou(wh, 9, generator=torch.Generator().manual_seed(seed))
        assert average_iou(wh, centroids).item() >= 0.672
    best = fit_anchors(wh * 416, 9, metric="iou", thr=0.0)  # fitness with thr 0 is the average IoU
    assert best.scores.avg_iou >= 0.675


def test_yolov2_table_k5(voc2007: BoxSet) -> None:
    """The paper's 61.0 is out of reach on this data: no search of ours found 5 anchors above 0.6063.

    (A long search, ``fit_anchors`` with 32 starts and 20,000 mutants over 4 seeds, and the default
    optimiser over seeds 0-4 top out at 0.6062-0.6063.) These 15,662 boxes include the 3,054 objects
    marked *difficult*, which darknet's ``voc_label.py`` (the labels YOLOv2 used) leaves out. So
    darknet's k-means must come within 0.002 of that bound, and the optimiser within 0.0005.
    """
    wh = normalised(voc2007)
    for seed in range(3):
        centroids = kmeans_iou(wh, 5, generator=torch.Generator().manual_seed(seed))
        assert average_iou(wh, centroids).item() >= 0.6042
    best = fit_anchors(wh * 416, 5, metric="iou", thr=0.0)
    assert best.scores.avg_iou >= 0.6058
