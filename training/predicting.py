"""A model ready to predict (:class:`LoadedModel`, what ``headstart.load`` returns) and its typed :class:`Answer`:
`headstart predict` prints these answers, ``headstart.load(...).predict`` returns them."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from pydantic import Field

from headstart.service.answers import Detection, LabelsAnswer, Prediction
from headstart.service.contract import Model
from headstart.service.errors import HeadstartError

#: What :meth:`LoadedModel.predict` takes: a path (file, folder or glob), the bytes of an image file, a PIL image,
#: an RGB array (H, W, 3) of uint8, or a list of these.
ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray


class Answer(LabelsAnswer):
    """One image's answer, as `headstart predict` prints it and ``/classify`` (``/localize``) returns it:
    ``predictions`` best first, the open-set answer (``novelty``, ``novelty_threshold``, ``unknown``), with
    ``localize=True`` the ``detections`` in the image's pixels; ``error`` instead for a file that cannot be read."""

    image: str | None = None  # the file, where the image came from one
    predictions: list[Prediction] = Field(default_factory=list)
    detections: list[Detection] | None = None
    method: str | None = None
    image_size: list[int] | None = None
    heatmap: str | None = None  # the heatmap file written (``heatmaps=``)
    sorted: list[str] | None = None  # the files the image was sorted as (``sort_into=``)
    error: str | None = None

    @property
    def label(self) -> str | None:
        """The best class, or None where the image could not be read or is "none of these" (``unknown``). A
        multi-label model's answer is :attr:`labels` (every label at or above its threshold)."""
        return None if self.error or self.unknown or not self.predictions else self.predictions[0].label

    @property
    def score(self) -> float | None:
        """The best class's probability (None where the image could not be read)."""
        return self.predictions[0].score if self.predictions else None


@dataclass
class LoadedModel:
    """A model ready to predict: a bundle on its runtime (OpenVINO or ONNX Runtime, as the service runs it) or a run
    directory's PyTorch model. ``model`` is the :class:`headstart.service.contract.Model` underneath."""

    model: Model
    source: str

    @property
    def task(self) -> str:
        return self.model.task

    @property
    def labels(self) -> list[str]:
        return list(self.model.labels)

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        top_k: int = 5,
        localize: bool = False,
        conf: float | None = None,
        novelty_threshold: float | None = None,
        label_threshold: float | None = None,
        batch_size: int = 16,
        heatmaps: str | os.PathLike | None = None,
        sort_into: str | os.PathLike | None = None,
        copy: bool = False,
    ) -> list[Answer]:
        """One :class:`Answer` per image, in order (a folder or glob stands for the images it holds, sorted; an
        http(s) URL for the image it gives, read within HEADSTART_MAX_FILE_BYTES and HEADSTART_URL_TIMEOUT). A file
        that cannot be read gets an answer with ``error`` set, as `headstart predict` prints an error line;
        ``localize`` adds boxes (class activation boxes for a classifier) kept from ``conf`` up. A multi-label model
        answers ``labels`` (those at or above their thresholds; ``label_threshold``: one threshold for all).
        ``heatmaps``: a folder to write each image's class activation heatmap of its top class into (a classifier's;
        ``NAME.heatmap.jpg``, the answer's ``heatmap``). ``sort_into``: a folder to sort the images into, a folder
        per class (``none-of-these``; a multi-label model's image into each of its labels' folders, ``no-label``),
        as links to the files (``copy``: copies; an image read from a URL: its bytes), the answer's ``sorted``
        (:mod:`headstart.sorting`; images under that folder are left out of the images given).
        :meth:`answers` gives the same answers one by one."""
        return list(
            self.answers(
                images,
                top_k=top_k,
                localize=localize,
                conf=conf,
                novelty_threshold=novelty_threshold,
                label_threshold=label_threshold,
                batch_size=batch_size,
                heatmaps=heatmaps,
                sort_into=sort_into,
                copy=copy,
            )
        )

    def answers(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        top_k: int = 5,
        localize: bool = False,
        conf: float | None = None,
        novelty_threshold: float | None = None,
        label_threshold: float | None = None,
        batch_size: int = 16,
        heatmaps: str | os.PathLike | None = None,
        sort_into: str | os.PathLike | None = None,
        copy: bool = False,
    ) -> Iterator[Answer]:
        """:meth:`predict`'s answers as they come, in order: each batch of ``batch_size`` images is answered as soon
        as it is decoded (ahead, on threads), so a long list of images is never held whole (`headstart predict`
        prints each line so)."""
        from headstart.service.ahead import in_order, reading_threads
        from headstart.service.files import is_url, read_image
        from headstart.service.inference import check_answer_options, classified, classify_images
        from headstart.service.localize import DEFAULTS, LocalizeParams, localize_images
        from headstart.service.preprocess import decode_for
        from headstart.sorting import inside, sort_folder

        check_answer_options(top_k, novelty_threshold, label_threshold)  # a typo is said, not answered in every line
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        params = LocalizeParams(conf=DEFAULTS.conf if conf is None else conf) if localize else None
        folder, named = self._heatmap_folder(heatmaps), set()
        sort = sort_folder(self.task, self.labels, sort_into, copy)
        items = _expand(images)
        if sort is not None:  # a rerun on the folder above: not the images the last sort put there
            items = [item for item in items if not inside(item, sort)]
        # (index, name, image or its error, the bytes of an image read from a URL where they are sorted), in order
        waiting: list[tuple[int, str | None, Image.Image | str, bytes | None]] = []

        def answered() -> Iterator[Answer]:
            pictures = [img for _, _, img, _ in waiting if not isinstance(img, str)]
            maps = iter([None] * len(pictures))  # each image's outputs for its heatmap, where the run gave them
            if params:  # one run gives the boxes, the class scores and the heatmaps
                located = localize_images(self.model, pictures, params, novelty_threshold)
                results = iter([classified(self.model, r["scores"], r, top_k, label_threshold) for r in located])
                boxes, maps = iter(located), iter([r["outputs"] for r in located])
            elif folder is not None:  # one run gives the answers and their heatmaps
                answers, outputs = self._with_outputs(pictures, top_k, novelty_threshold, label_threshold)
                results, boxes, maps = iter(answers), iter([{}] * len(pictures)), iter(outputs)
            else:
                results = iter(classify_images(self.model, pictures, top_k, novelty_threshold, label_threshold))
                boxes = iter([{}] * len(pictures))
            for i, name, img, data in waiting:
                if isinstance(img, str):
                    yield Answer(image=name, error=img)
                    continue
                extra = {k: v for k, v in next(boxes).items() if k in ("detections", "method", "image_size")}
                answer = Answer(image=name, **next(results), **extra)
                outputs = next(maps)
                if folder is not None:
                    target = folder / _heatmap_name(items[i], i, named)
                    answer = self._with_heatmap(answer, img, target, novelty_threshold, outputs)
                if sort is not None and not answer.error:
                    answer = _sorted(answer, items[i], data, sort, copy, i)
                yield answer
            waiting.clear()

        decoded = 0

        def decode(item: ImageInput) -> tuple[Image.Image, bytes | None]:
            if sort is not None and isinstance(item, str) and is_url(item):  # its bytes are what is sorted
                data = read_image(item)
                return decode_for(data, self.model.spec), data
            return self._decode(item), None

        ahead = in_order(decode, items, threads=reading_threads(items))  # decoded ahead (URLs: more threads)
        for i, (item, image) in enumerate(zip(items, ahead, strict=True)):
            try:
                waiting.append((i, _name_of(item), *image.result()))
                decoded += 1
            except (HeadstartError, OSError, ValueError) as exc:
                waiting.append((i, _name_of(item), str(exc), None))
            if decoded >= batch_size:
                yield from answered()
                decoded = 0
        yield from answered()

    def _heatmap_folder(self, heatmaps: str | os.PathLike | None) -> Path | None:
        """The folder heatmaps go to, made; refused at once for a model without class activation maps."""
        from headstart.service import fonts
        from headstart.service.heatmap import require_class_map

        if heatmaps is None:
            return None
        require_class_map(self.model)
        fonts.check(self.model.labels)  # said before the first heatmap: a label no font here draws
        folder = Path(heatmaps)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _with_outputs(
        self, pictures: list[Image.Image], top_k: int, novelty_threshold: float | None, label_threshold: float | None
    ) -> tuple[list[dict], list[dict[str, np.ndarray]]]:
        """``classify_images``' answers for ``pictures`` and each picture's outputs by name (its class map for the
        heatmap), from one run of the model over them."""
        from headstart.service.inference import classify_scores, gives_novelty
        from headstart.service.preprocess import preprocess_batch

        if not pictures:  # a batch of unreadable files only, or nothing left at the end: no run
            return [], []
        names = list(self.model.output_names)
        outputs = dict(zip(names, self.model.run(preprocess_batch(pictures, self.model.spec)), strict=True))
        novelty = outputs["novelty"] if gives_novelty(self.model) else None
        answers = classify_scores(self.model, outputs[names[0]], novelty, top_k, novelty_threshold, label_threshold)
        return answers, [{name: output[i] for name, output in outputs.items()} for i in range(len(pictures))]

    def _with_heatmap(
        self,
        answer: Answer,
        img: Image.Image,
        target: Path,
        novelty_threshold: float | None,
        outputs: dict[str, np.ndarray] | None = None,
    ) -> Answer:
        """``answer`` with its heatmap written to ``target`` (or, where the file cannot be written, the error);
        ``outputs``: the image's from the run that answered it (else the heatmap runs the model again)."""
        from headstart.service.heatmap import heatmap

        try:
            heatmap(self.model, img, threshold=novelty_threshold, outputs=outputs).image.save(target, quality=90)
        except OSError as exc:
            return Answer(image=answer.image, error=f"The heatmap could not be written to {target}: {exc}")
        return answer.model_copy(update={"heatmap": str(target)})

    def _decode(self, item: ImageInput) -> Image.Image:
        from headstart.service.errors import ImageError
        from headstart.service.files import read_image
        from headstart.service.formats import conversion_hint
        from headstart.service.preprocess import decode_for

        if isinstance(item, Image.Image):  # as a file of it would be: EXIF orientation applied, RGB
            return ImageOps.exif_transpose(item).convert("RGB")
        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
                raise ValueError(f"an image array must be uint8 (height, width, 3) RGB, not {item.dtype} {item.shape}")
            return Image.fromarray(item)
        if isinstance(item, bytes):
            return decode_for(item, self.model.spec)
        try:
            return decode_for(read_image(item), self.model.spec)  # a file, or an http(s) URL
        except ImageError as exc:  # a camera's RAW photo, a video...: said with what to do
            hint = conversion_hint(item)
            if not hint:
                raise
            raise ImageError(f"{exc}{hint}") from None


def _expand(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """Single inputs as a list of one; folders and globs as the images they hold; a .txt or .csv file as the images
    it lists (a path or URL per line; a .csv's ``path`` column or the like), as `headstart predict-batch` reads one."""
    from headstart.service.files import image_paths, listed_images, table_images

    items: Iterable[ImageInput]
    items = [images] if isinstance(images, str | os.PathLike | bytes | Image.Image | np.ndarray) else images
    out: list[ImageInput] = []
    for item in items:
        if isinstance(item, str | os.PathLike):
            found = image_paths(os.fspath(item))
            suffix = Path(item).suffix.lower()
            if found is None and suffix in (".txt", ".csv") and Path(item).is_file():
                found = listed_images(item) if suffix == ".txt" else table_images(item)
            out += [item] if found is None else found
        else:
            out.append(item)
    return out


def _heatmap_name(item: ImageInput, index: int, named: set[str]) -> str:
    """A heatmap's file name, ``NAME.heatmap.jpg``: NAME the image file's stem, else the image's place in the list;
    a name given before in this call (a.jpg in two folders) gets -2, -3, ... so that no heatmap overwrites another;
    a stem too long for a file name with them is cut (:func:`headstart.sorting.fitted`)."""
    from headstart.service.files import is_url
    from headstart.sorting import fitted

    if is_url(item):  # https://host/photos/cat.jpg?w=800: cat
        from urllib.parse import unquote, urlsplit

        item = unquote(urlsplit(item).path)
    stem = Path(item).stem if isinstance(item, str | os.PathLike) else ""
    stem = stem or f"image-{index}"
    name, n = fitted(stem, ".heatmap.jpg"), 1
    while name.casefold() in named:  # A.jpg and a.jpg: one file on a case-insensitive file system
        n += 1
        name = fitted(stem, f"-{n}.heatmap.jpg")
    named.add(name.casefold())
    return name


def _sorted(answer: Answer, item: ImageInput, data: bytes | None, folder: Path, copy: bool, index: int) -> Answer:
    """``answer`` with its image sorted into ``folder`` (:func:`headstart.sorting.file_image`), or, where the file
    cannot be written (a full disk), the error."""
    from headstart.sorting import SortError, file_image

    try:
        written = file_image(answer, item, data, folder, copy, index)
    except SortError:
        raise  # the folder cannot take links: stop, the message says to add --copy
    except OSError as exc:
        return Answer(image=answer.image, error=f"The image could not be sorted into {folder}: {exc}")
    return answer if written is None else answer.model_copy(update={"sorted": [str(p) for p in written]})


def _name_of(item: ImageInput) -> str | None:
    from headstart.service.files import shown

    return shown(item) if isinstance(item, str | os.PathLike) else None
