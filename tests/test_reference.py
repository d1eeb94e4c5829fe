"""The same seed gives the same trained weights, bit for bit, as the reference runs stored in tests/reference/.

The references were written by the trainers before they became one engine (commit b8f400a); refactoring the training
code must not change a single bit of what a run learns, nor the files a run directory holds. To record new references
after an intended change of behaviour: ``HEADSTART_UPDATE_REFERENCE=1 pytest tests/test_reference.py`` (and say why
in the commit).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tests.conftest import COCO128, HYMENOPTERA, MOBILENET, coco128_report, make_image_folder, require_shared

REFERENCE = Path(__file__).parent / "reference" / "runs.json"
UPDATE = os.environ.get("HEADSTART_UPDATE_REFERENCE") == "1"


def tensor_digests(path: Path) -> dict[str, dict]:
    """Per tensor: sha256 of dtype, shape and raw bytes, and (for reading a failure) its sum and largest |value|."""
    from safetensors.torch import load_file

    out = {}
    for key, t in sorted(load_file(str(path)).items()):
        t = t.contiguous()
        raw = t.reshape(-1).view(-1).numpy().tobytes() if t.numel() else b""
        digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + raw).hexdigest()
        out[key] = {"sha256": digest, "sum": float(t.double().sum()), "absmax": float(t.abs().max())}
    return out


def run_record(run_dir: Path) -> dict:
    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    record = {"files": files, "head": tensor_digests(run_dir / "head.safetensors")}
    if (run_dir / "backbone.safetensors").is_file():
        record["backbone"] = tensor_digests(run_dir / "backbone.safetensors")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    record["metrics"] = {k: metrics[k] for k in ("accuracy", "map50", "map50_95") if k in metrics}
    return record


def check(name: str, run_dir: Path) -> None:
    got = run_record(run_dir)
    stored = json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else {}
    if UPDATE:
        stored[name] = got
        REFERENCE.parent.mkdir(exist_ok=True)
        REFERENCE.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        return
    assert name in stored, f"no reference {name!r} in {REFERENCE}; record it with HEADSTART_UPDATE_REFERENCE=1"
    want = stored[name]
    assert got["files"] == want["files"], "the run directory holds other files than the reference run"
    for part in ("head", "backbone"):
        assert set(got.get(part, {})) == set(want.get(part, {})), f"{part}: other tensors than the reference"
        changed = {k: (want[part][k]["sum"], v["sum"]) for k, v in got.get(part, {}).items()
                   if v["sha256"] != want[part][k]["sha256"]}  # fmt: skip
        assert not changed, f"{part} tensors differ from the reference (sum: reference, now): {changed}"
    assert got["metrics"] == want["metrics"]


def test_classifier_on_hymenoptera_learns_the_reference_head(tmp_path):
    require_shared()
    from training.tasks import ClassifyConfig, train

    cfg = ClassifyConfig(data_dir=str(HYMENOPTERA), out=str(tmp_path / "run"), backbone="torchvision:mobilenet_v2",
                      weights=str(MOBILENET), views=2, epochs=8, cache_dir=str(tmp_path / "cache"),
                      progress=False)  # fmt: skip
    check("classify-hymenoptera", train(cfg))


def test_classifier_with_hidden_layer_and_unfreezing_learns_the_reference_weights(tmp_path):
    from training.tasks import ClassifyConfig, train

    data = make_image_folder(tmp_path / "data", {"red": 12, "blue": 12, "green": 12}, seed=3,
                             splits={"train": 0.75, "val": 0.25})  # fmt: skip
    cfg = ClassifyConfig(data_dir=str(data), out=str(tmp_path / "run"), backbone="test_resnet", pretrained=False,
                      views=2, hidden=16, epochs=6, batch_size=8, label_smoothing=0.1, unfreeze=1,
                      finetune_epochs=2, cache_dir=str(tmp_path / "cache"), progress=False)  # fmt: skip
    check("classify-unfreeze-synthetic", train(cfg))


def test_detector_on_coco128_learns_the_reference_head(tmp_path):
    require_shared()
    from training.tasks import DetectConfig, train

    cfg = DetectConfig(data_dir=str(COCO128), out=str(tmp_path / "run"), backbone="torchvision:mobilenet_v2",
                       weights=str(MOBILENET), head="grid", input_size=224, views=2, hidden=32, epochs=6, eval_every=2,
                       cache_dir=str(tmp_path / "cache"), progress=False)  # fmt: skip
    check("detect-coco128", train(cfg, coco128_report(40, 12)))
