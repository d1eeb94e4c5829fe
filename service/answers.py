"""What the service answers, as pydantic models: the JSON of each endpoint, documented in its OpenAPI schema."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    label: str
    index: int
    score: float


class ModelInfo(BaseModel):
    name: str
    version: str


class OpenSetAnswer(BaseModel):
    """ "None of these": ``unknown`` is true when the image is less like the training images than the threshold allows
    (``novelty`` above ``novelty_threshold``), whatever the class probabilities say. All null for a model without a
    novelty score (exported before it existed, or a detector)."""

    novelty: float | None = None
    novelty_threshold: float | None = None
    unknown: bool | None = None


class LabelsAnswer(OpenSetAnswer):
    """``labels``: what the model says the image holds. A multi-label model: every label at or above its threshold,
    best first (possibly none); a model whose labels exclude each other: its best class, or none where the image is
    "none of these" (``unknown``). ``predictions`` are the scores, best first, whatever the answer."""

    labels: list[Prediction] = Field(default_factory=list)


class ClassifyResponse(LabelsAnswer):
    predictions: list[Prediction]
    model: ModelInfo


class BatchItem(LabelsAnswer):
    """One image of a batch: predictions, or an error for that image alone."""

    predictions: list[Prediction] = Field(default_factory=list)
    model: ModelInfo
    error: str | None = None


class Box(BaseModel):
    x1: float
    y1: float
    x2: float
    y2: float


class Detection(BaseModel):
    label: str
    index: int
    confidence: float
    box: Box


class LocalizeResponse(LabelsAnswer):
    """Detections in original-image pixels (after EXIF rotation), best first, after non-maximum suppression."""

    detections: list[Detection]
    grid: list[int]
    image_size: list[int]
    method: str
    predictions: list[Prediction]
    model: ModelInfo


class InfoResponse(BaseModel):
    name: str
    version: str
    task: str
    labels: list[str]
    input_size: int
    preprocess: dict
    backbone: str
    metrics: dict
    runtime: str  # openvino | onnxruntime
    device: str  # cpu | cuda
    precision: str  # what the runtime computes in: fp32, or bf16 where the export verified it
    precision_note: str
    providers: list[str]
    variant: str
    max_request_bytes: int
    cpu: dict  # model, cores, kind and the extensions that decide the kernels (AMX, AVX-512 BF16/VNNI, AVX2)
    #: "none of these": the threshold in force and where it comes from, the kept rate the export calibrated it at,
    #: k and the bank; null for a model without a novelty score (open_set_note says why)
    open_set: dict | None
    open_set_note: str
    #: a multi-label model's thresholds (global, per label, how they were chosen); null for a single-label model
    thresholds: dict | None = None
    #: how the bundle's int8 file was made and measured at export (``weight_bits``: 7, or 8 for CPUs with VNNI or
    #: AMX; the calibration; the accuracy against fp32), whichever variant is served; null for a bundle without one
    int8: dict | None = None
