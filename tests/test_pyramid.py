"""The multi-scale detector's parts: pyramid features, assignment, loss, decoding, mosaic, folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from headstart.crossval import fold_report, make_folds, summarise
from headstart.models import build_backbone
from headstart.models.pyramid import Pyramid, PyramidHead, PyramidHeadConfig
from headstart.tasks.detect.augment import mosaic
from headstart.tasks.detect.crossval import METRICS
from headstart.tasks.detect.data import DetectionReport, DetSample
from headstart.tasks.detect.pyramid_loss import assign, box_iou_giou, level_points, pyramid_loss


@pytest.mark.parametrize("name", ["torchvision:mobilenet_v2", "torchvision:resnet18", "resnet18"])
def test_pyramid_takes_the_last_map_at_strides_8_16_32_of_any_backbone(name):
    backbone = build_backbone(name, pretrained=False)
    pyramid = Pyramid(backbone.features)
    maps = pyramid(torch.zeros(2, 3, 128, 128))
    assert [m.shape[-1] for m in maps] == [16, 8, 4]
    assert tuple(m.shape[1] for m in maps) == pyramid.channels
    assert maps[-1].shape[1] == backbone.num_features  # stride 32 is the backbone's own output


def test_pyramid_keeps_the_frozen_backbone_batchnorm_in_eval_mode():
    pyramid = Pyramid(build_backbone("torchvision:resnet18", pretrained=False).features).train()
    norms = [m for m in pyramid.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)


def _cells(cls: np.ndarray, size: int, strides=(8, 16, 32)) -> dict[int, list[int]]:
    """Assigned cells per level index."""
    _, _, level = level_points(size, strides)
    return {i: np.flatnonzero((cls >= 0) & (level == i)).tolist() for i in range(len(strides))}


def test_assignment_sends_small_objects_to_fine_levels_and_large_ones_to_coarse_levels():
    size = 256
    targets = np.array(
        [
            [0, 0.2, 0.2, 20 / size, 24 / size],  # 20x24 px: stride 8
            [1, 0.7, 0.3, 100 / size, 90 / size],  # 100 px: half of it within 4 x 16 → stride 16
            [2, 0.5, 0.7, 0.9, 0.5],
        ],
        np.float32,
    )
    cls, box = assign(targets, size, (8, 16, 32))
    cells = _cells(cls, size)
    assert set(cls[cells[0]]) == {0} and set(cls[cells[1]]) == {1} and set(cls[cells[2]]) == {2}
    centres, _, _ = level_points(size, (8, 16, 32))
    for i in np.flatnonzero(cls >= 0):  # every assigned cell's centre lies in its box
        x1, y1, x2, y2 = box[i].astype(np.float32)
        assert x1 < centres[i, 0] < x2 and y1 < centres[i, 1] < y2


def test_an_object_smaller_than_a_cell_still_gets_the_cell_under_its_centre():
    size = 128
    cls, box = assign(np.array([[0, 0.51, 0.49, 2 / size, 2 / size]], np.float32), size, (8, 16, 32))
    assert (cls >= 0).sum() == 1
    i = int(np.flatnonzero(cls >= 0)[0])
    n = size // 8
    assert i == int(0.49 * size // 8) * n + int(0.51 * size // 8)


def test_a_cell_claimed_by_two_objects_goes_to_the_smaller_one():
    size = 128
    targets = np.array([[0, 0.5, 0.5, 0.4, 0.4], [1, 0.5, 0.5, 0.3, 0.3]], np.float32)
    cls, _ = assign(targets, size, (8, 16, 32))
    assert (cls == 1).sum() > 0 and set(cls[cls >= 0]) <= {0, 1}
    centre = (int(0.5 * size) // 8) * (size // 8) + int(0.5 * size) // 8
    assert cls[centre] == 1


def test_background_views_assign_nothing():
    cls, box = assign(np.zeros((0, 5), np.float32), 128, (8, 16, 32))
    assert (cls == -1).all() and not box.any()


def test_loss_falls_when_the_head_learns_the_targets():
    torch.manual_seed(0)
    size = 128
    head = PyramidHead(PyramidHeadConfig((8, 16, 32), 2, size, width=16, dropout=0.0))
    maps = torch.randn(4, 8 * 16 * 16 + 16 * 8 * 8 + 32 * 4 * 4)
    targets = [np.array([[k % 2, 0.3 + 0.1 * k, 0.5, 0.3, 0.4]], np.float32) for k in range(4)]
    assigned = [assign(t, size, (8, 16, 32)) for t in targets]
    tcls = torch.from_numpy(np.stack([a[0] for a in assigned]))
    tbox = torch.from_numpy(np.stack([a[1] for a in assigned]))
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        boxes, logits = head.decode(head(maps), logits=True)
        loss, parts = pyramid_loss(boxes, logits, tcls, tbox)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < 0.3 * losses[0]
    assert set(parts) == {"class", "box"}


def _dense_quality_focal(logits, tcls, quality):
    """The loss's definition, as autograd computes it on a dense target."""
    target = torch.zeros_like(logits)
    pos = tcls >= 0
    target[pos, tcls[pos].long()] = quality
    prob = torch.sigmoid(logits)
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * (prob - target).pow(2)).sum()


@pytest.mark.parametrize("quality_target", [True, False])
def test_the_loss_and_its_gradient_are_the_quality_focal_loss_as_defined(quality_target):
    """The written-out loss (a block of rows at a time, the cells with a target corrected) against autograd's dense
    BCE x (σ - t)² on the same batch, in float64: values and gradients within float32 rounding, from logits of -40
    to 40 (where softplus's shortcut and the sigmoid saturate), the logits a strided view as decode gives them, one
    gradient scaled as a sum of losses scales it."""
    gen = torch.Generator().manual_seed(0)
    n, p, k = 3, 5000, 7  # more rows than one block of 4096
    raw = torch.randn(n, p, 4 + k, generator=gen) * 4 - 3
    raw[0, :40, 4:] = torch.linspace(-40, 40, 40 * k).reshape(40, k)
    tcls = torch.where(torch.rand(n, p, generator=gen) < 0.02, torch.randint(0, k, (n, p), generator=gen), -1)
    tcls[0, :40:3] = 2  # targets among the extreme logits too
    boxes = torch.rand(n, p, 4, generator=gen) * 50
    boxes[..., 2:] += boxes[..., :2] + 1
    tbox = (boxes + torch.randn(n, p, 4, generator=gen) * 5).half()
    npos = int((tcls >= 0).sum())

    raw32 = raw.clone().requires_grad_()
    loss, parts = pyramid_loss(boxes, raw32[..., 4:], tcls, tbox, quality_target=quality_target)
    (3 * loss).backward()

    raw64 = raw.double().requires_grad_()
    pos = tcls >= 0
    iou, giou = box_iou_giou(boxes[pos].double(), tbox[pos].double())
    quality = iou.clamp(min=0) if quality_target else torch.ones_like(iou)
    cls64 = _dense_quality_focal(raw64[..., 4:], tcls, quality) / npos
    (3 * (cls64 + 2.0 * (1 - giou).sum() / npos)).backward()

    assert parts["class"] == pytest.approx(cls64.item(), rel=1e-5)
    assert raw32.grad[..., :4].abs().max() == 0  # only the logits took a gradient here
    grad64 = raw64.grad[..., 4:]
    # autograd on the dense float32 formula is off by 1.4e-6 of the largest gradient here, as is this loss
    assert (raw32.grad[..., 4:].double() - grad64).abs().max() <= 1e-5 * grad64.abs().max()


def test_decoded_boxes_lie_inside_the_input_and_cover_every_level():
    cfg = PyramidHeadConfig((8, 16, 32), 3, 128, width=16)
    head = PyramidHead(cfg).eval()
    with torch.no_grad():
        raw = head([torch.randn(2, 8, 16, 16) * 5, torch.randn(2, 16, 8, 8) * 5, torch.randn(2, 32, 4, 4) * 5])
        boxes, scores = head.decode(raw, 128)
    assert boxes.shape == (2, cfg.num_predictors, 4) and scores.shape == (2, cfg.num_predictors, 3)
    assert cfg.num_predictors == 16 * 16 + 8 * 8 + 4 * 4
    assert boxes.min() >= 0 and boxes.max() <= 128 and (boxes[..., 2:] >= boxes[..., :2]).all()
    assert ((scores >= 0) & (scores <= 1)).all()
    with pytest.raises(ValueError, match="trained at input size 128"):
        head.decode(raw, 256)


def test_head_config_round_trips_through_its_record():
    cfg = PyramidHeadConfig((32, 96, 1280), 80, 512, width=64)
    assert PyramidHeadConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["kind"] == "pyramid"
    with pytest.raises(ValueError, match="multiple of every stride"):
        PyramidHeadConfig((8, 16, 32), 1, 100)


def _painted(colour: tuple[int, int, int], box: tuple[float, float, float, float]) -> tuple:
    """A 200x100 grey image with one ``colour`` rectangle at the YOLO ``box``."""
    arr = np.full((100, 200, 3), 60, np.uint8)
    cx, cy, w, h = box
    arr[
        round((cy - h / 2) * 100) : round((cy + h / 2) * 100), round((cx - w / 2) * 200) : round((cx + w / 2) * 200)
    ] = colour
    return arr, np.array([0]), np.array([box], np.float32)


def test_mosaic_moves_every_box_with_its_pixels():
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)]
    images = [_painted(c, (0.5, 0.5, 0.4, 0.5)) for c in colours]
    for seed in range(20):
        canvas, classes, boxes = mosaic(images, 256, np.random.default_rng(seed))
        assert canvas.shape == (256, 256, 3) and len(classes) == len(boxes) <= 4
        assert ((boxes[:, :2] - boxes[:, 2:] / 2) >= -1e-6).all() and (
            (boxes[:, :2] + boxes[:, 2:] / 2) <= 1 + 1e-6
        ).all()
        for cx, cy, _, _ in boxes * 256:  # the middle of each box shows one of the painted colours
            pixel = canvas[int(cy), int(cx)]
            assert tuple(int(v) for v in pixel) in colours


def _samples(n: int) -> list[DetSample]:
    return [
        DetSample(Path(f"/x/{i}.jpg"), f"{i:064x}", np.zeros(1, np.int64), np.full((1, 4), 0.5, np.float32))
        for i in range(n)
    ]


def test_folds_are_disjoint_cover_every_image_and_do_not_depend_on_the_order():
    samples = _samples(23)
    folds = make_folds(samples, 4, seed=0)
    ids = [s.sha256 for f in folds for s in f]
    assert len(ids) == len(set(ids)) == 23 and {len(f) for f in folds} <= {5, 6}
    again = make_folds(list(reversed(samples)), 4, seed=0)
    assert [[s.sha256 for s in f] for f in again] == [[s.sha256 for s in f] for f in folds]
    assert make_folds(samples, 4, seed=1) != folds
    with pytest.raises(ValueError, match="--folds"):
        make_folds(samples, 1, 0)


def test_a_folds_training_data_never_holds_its_test_images():
    samples = _samples(20)
    report = DetectionReport(Path("/x"), Path("/x/data.yaml"), ["a"], splits={"train": samples})
    folds = make_folds(samples, 4, 0)
    for i in range(4):
        fold, test = fold_report(report, folds, i, 0.2, 0)
        seen = {s.sha256 for split in fold.splits.values() for s in split}
        assert seen.isdisjoint({s.sha256 for s in test}) and len(seen) + len(test) == 20
        assert len(fold.splits["val"]) == 3


def test_the_summary_gives_mean_and_spread_and_skips_missing_sizes():
    rows = [
        {"map50": 0.2, "map50_95": 0.1, "map_small": -1.0, "map_medium": 0.1, "map_large": 0.3, "train_seconds": 5},
        {"map50": 0.4, "map50_95": 0.1, "map_small": 0.05, "map_medium": 0.3, "map_large": 0.5, "train_seconds": 7},
    ]
    out = summarise(rows, METRICS)
    assert out["map50"]["mean"] == pytest.approx(0.3) and out["map50"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert out["map_small"] == {"mean": 0.05, "std": 0.0}


# ---------------------------------------------------------------- end to end (real pretrained features)

SIZES = {"small": (18, 30), "medium": (70, 110), "large": (150, 210)}  # object sides in pixels of a 256 input


def _scene(rng: np.random.Generator, objects: list[tuple[int, Image.Image]]) -> tuple[Image.Image, list]:
    """A 256x256 noisy background with the given (side, photo) objects pasted where they do not overlap."""
    canvas = Image.fromarray(rng.integers(90, 140, (256, 256, 3), dtype=np.uint8))
    taken: list[tuple[int, int, int, int]] = []
    boxes = []
    for side, obj in sorted(objects, key=lambda o: -o[0]):
        for _ in range(200):
            x, y = (int(v) for v in rng.integers(0, 256 - side + 1, 2))
            if all(x + side <= a or a + c <= x or y + side <= b or b + d <= y for a, b, c, d in taken):
                break
        taken.append((x, y, side, side))
        canvas.paste(obj.resize((side, side)), (x, y))
        boxes.append((0, (x + side / 2) / 256, (y + side / 2) / 256, side / 256, side / 256))
    return canvas, boxes


def _scene_dataset(root: Path, n: int, seed: int) -> Path:
    from .conftest import PHOTOS

    photos = [Image.open(p).convert("RGB") for p in sorted(PHOTOS.glob("*.bmp"))]
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        kinds = ["small", "small", "medium", "large"] if i % 2 else ["small", "medium"]
        objects = [(int(rng.integers(*SIZES[k])), photos[int(rng.integers(len(photos)))]) for k in kinds]
        img, boxes = _scene(rng, objects)
        img.save(root / "images" / f"{i:03d}.png")
        (root / "labels" / f"{i:03d}.txt").write_text(
            "".join(f"{b[0]} {b[1]:.6f} {b[2]:.6f} {b[3]:.6f} {b[4]:.6f}\n" for b in boxes)
        )
    (root / "data.yaml").write_text("train: images\nnames: [photo]\n")
    return root


def test_every_scale_finds_the_objects_of_its_size_on_an_unseen_scene(tmp_path):
    """Trained on scenes of small, medium and large photos, the detector finds each object of an unseen scene
    with a cell of the level made for its size."""
    from .conftest import MOBILENET, PHOTOS, require_shared

    require_shared()
    from headstart.loaded_run import load_run
    from headstart.tasks import DetectConfig, train

    data = _scene_dataset(tmp_path / "data", 32, seed=0)
    cfg = DetectConfig(
        data_dir=str(data),
        out=str(tmp_path / "run"),
        backbone="torchvision:mobilenet_v2",
        weights=str(MOBILENET),
        input_size=256,
        views=2,
        augment="light",
        mosaic=0.0,
        epochs=24,
        eval_every=4,
        patience=100,
        lr=3e-3,
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    run = load_run(train(cfg))
    photo = Image.open(PHOTOS / "dragonfly.bmp").convert("RGB")
    scene, boxes = _scene(np.random.default_rng(99), [(24, photo), (90, photo), (180, photo)])
    with torch.no_grad():
        _, pred, scores = run.model(torch.from_numpy(np.asarray(scene, np.float32).transpose(2, 0, 1)[None].copy()))
    cfg_head = run.model.head.cfg
    starts = np.cumsum([0] + [h * w for h, w in cfg_head.sizes])
    for _, cx, cy, w, h in boxes:
        truth = torch.tensor([[(cx - w / 2) * 256, (cy - h / 2) * 256, (cx + w / 2) * 256, (cy + h / 2) * 256]])
        from torchvision.ops import box_iou

        iou = box_iou(pred[0], truth)[:, 0]
        score = torch.where(iou > 0.5, scores[0, :, 0], torch.zeros(()))
        best = int(score.argmax())
        side = w * 256
        expected = 0 if side <= 64 else 1 if side <= 128 else 2
        assert score[best] > 0.25, (side, float(score[best]))
        assert starts[expected] <= best < starts[expected + 1], (side, best, starts)


def test_crossval_scores_every_fold_on_images_it_never_trained_on_and_repeats_itself(tmp_path, capsys):
    """`headstart crossval` on coco128, person only, 2 folds of a few epochs: finite AP per fold, the mean and spread,
    the fold runs; the same seed again (features from the cache) gives the same numbers."""
    import json

    from headstart.cli import main

    from .conftest import COCO128, MOBILENET, require_shared

    require_shared()
    args = [
        str(COCO128),
        "--folds",
        "2",
        "--classes",
        "person",
        "--backbone",
        "torchvision:mobilenet_v2",
        "--weights",
        str(MOBILENET),
        "--input-size",
        "128",
        "--views",
        "1",
        "--epochs",
        "3",
        "--eval-every",
        "1",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
    ]
    assert main(["crossval", *args, "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "map50 " in printed and "±" in printed and "crossval.json" in printed
    summary = json.loads((tmp_path / "a" / "crossval.json").read_text())
    assert summary["classes"] == ["person"] and summary["folds"] == 2 and summary["images"] == 128
    folds = summary["per_fold"]
    assert sum(f["test_images"] for f in folds) == 128
    assert all(0.0 <= f["map50_95"] <= f["map50"] <= 1.0 for f in folds)
    assert summary["map50"]["mean"] == pytest.approx(sum(f["map50"] for f in folds) / 2)
    for i in (1, 2):
        splits = json.loads((tmp_path / "a" / f"fold-{i}" / "splits.json").read_text())
        trained = {Path(p).name for split in splits.values() for p, _ in split}
        assert len(trained) == 128 - folds[i - 1]["test_images"]
    assert main(["crossval", *args, "--out", str(tmp_path / "b")]) == 0
    again = json.loads((tmp_path / "b" / "crossval.json").read_text())
    assert [(f["map50"], f["map50_95"]) for f in again["per_fold"]] == [(f["map50"], f["map50_95"]) for f in folds]
