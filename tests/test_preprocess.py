"""Image decoding and preprocessing: the contract shared by training and serving (no torch needed)."""

from __future__ import annotations

import io
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from headstart.service.formats import BASE_FORMATS, allowed_formats, isobmff_brands, refuse_before_open
from headstart.service.preprocess import (
    ImageError,
    PreprocessSpec,
    count_jpeg_scans,
    decode_for,
    decode_image,
    original_size,
    preprocess,
    resize_and_crop,
    resized_size,
    to_rgb,
)

from .conftest import HYMENOPTERA, PHOTOS, SHARED
from .images import hostile_images, mutants, phone_formats, photo, png_chunk, seed_images, work_bombs


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(w: int = 64, h: int = 48) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None]
    arr[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    return Image.fromarray(arr)


@pytest.mark.parametrize(
    "make",
    [
        lambda: gradient().convert("L"),
        lambda: gradient().convert("P"),
        lambda: gradient().convert("RGBA"),
        lambda: gradient().convert("LA"),
        lambda: gradient().convert("CMYK"),
        lambda: Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)),
    ],
    ids=["L", "P", "RGBA", "LA", "CMYK", "I;16"],
)
def test_every_mode_becomes_rgb(make):
    img = make()
    fmt = "JPEG" if img.mode == "CMYK" else ("TIFF" if img.mode == "I;16" else "PNG")
    out = decode_image(encode(img, fmt))
    assert out.mode == "RGB"
    assert out.size == (64, 48)


def test_16bit_uses_full_range():
    arr = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    out = np.asarray(decode_image(encode(Image.fromarray(arr), "PNG")))
    assert out.min() == 0 and out.max() == 255


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.asarray(decode_image(encode(img)))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied():
    img = gradient(64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = decode_image(encode(img, "JPEG", exif=exif))
    assert out.size == (32, 64)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    r, g, b = np.asarray(decode_image(data))[8, 8]
    assert r > 200 and b < 50


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"hello, this is not an image", "not an image"),
        (encode(gradient(), "JPEG")[:300], "truncated"),
        (encode(Image.new("RGB", (1, 1))), "at least"),
    ],
    ids=["empty", "text", "truncated-jpeg", "1x1"],
)
def test_bad_images_raise_image_error(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data)


def test_decoding_on_several_threads_stays_quiet_and_leaves_the_warning_filters_as_they_were(monkeypatch):
    # each decode had its own warnings.catch_warnings, which saves and restores the process's filters: overlapping
    # decodes (the data scan's threads, the service's) left "ignore every warning" in place for the whole process
    import headstart.service.preprocess as pp

    checked = pp.refuse_before_open

    def warn_then_check(fp):  # as PIL warns for a damaged EXIF block inside a decode
        warnings.warn("a damaged EXIF block", UserWarning, stacklevel=1)
        return checked(fp)

    monkeypatch.setattr(pp, "refuse_before_open", warn_then_check)
    data = [encode(gradient(64 + i % 7, 48), "JPEG") for i in range(64)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        for _ in range(10):
            with ThreadPoolExecutor(4) as pool:
                assert [img.size for img in pool.map(decode_image, data)] == [(64 + i % 7, 48) for i in range(64)]
            assert warnings.filters == before
        warnings.warn("after the decoding", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["after the decoding"]


def test_decompression_bomb_is_refused_before_decoding():
    # a 20000 x 20000 PNG compresses to a few hundred kilobytes but would need 1.2 GB decoded
    data = encode(Image.new("L", (20000, 20000)), "PNG")
    assert len(data) < 2_000_000
    with pytest.raises(ImageError, match="too large"):
        decode_image(data, max_pixels=50_000_000)


def test_preprocess_shape_range_and_centre_crop():
    spec = PreprocessSpec(input_size=32, resize=40)
    out = preprocess(gradient(80, 40), spec)
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    # the crop is centred: the red gradient is symmetric about the middle column
    assert abs(out[0, 16, :].mean() - 127.5) < 10


def test_real_photos_decode(tmp_path):
    for path in [*PHOTOS.glob("*.bmp"), *PHOTOS.glob("*.jpg"), *HYMENOPTERA.rglob("*.gif")]:
        img = decode_image(path)
        assert img.mode == "RGB" and min(img.size) > 10


def test_spec_round_trip_and_validation():
    spec = PreprocessSpec(input_size=224, resize=256, interpolation="bicubic")
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="interpolation"):
        PreprocessSpec(interpolation="cubic-ish")
    with pytest.raises(ValueError, match="resize"):
        PreprocessSpec(input_size=224, resize=200)


# ---------------------------------------------------------------- hostile input


def test_every_allowed_format_decodes_whatever_the_file_is_called(tmp_path):
    for name, data in seed_images():
        path = tmp_path / f"{name}.txt"  # the name says nothing: the bytes decide
        path.write_bytes(data)
        assert decode_image(data).size == decode_image(path).size == (32, 24), name


def test_mutation_fuzz_raises_nothing_but_image_error():
    """Pillow raises ValueError, struct.error, IndexError, TypeError, ... on damaged headers: each must become the
    image's own ImageError (a 400 in the service, a skipped file in training), never escape."""
    decoded = refused = 0
    for name, data in mutants(seed=3, count=3000):
        try:
            decode_image(data)
            decoded += 1
        except ImageError:
            refused += 1
        except Exception as exc:  # pragma: no cover - the failure this test exists to catch
            raise AssertionError(f"{name}: {type(exc).__name__}: {exc}") from exc
    assert decoded > 300 and refused > 300  # the fuzz reaches both outcomes


@pytest.mark.parametrize("name", list(hostile_images()))
def test_hostile_images_are_refused_before_decoding(name, monkeypatch):
    """Refused from the header alone: not one pixel decoded (counted, not timed: a loaded machine is slow, not
    wrong)."""
    from PIL import ImageFile

    data, _, message = hostile_images()[name]
    normal = encode(photo(), "PNG")
    decoded, load = [], ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.format) or load(self))
    with pytest.raises(ImageError, match=message):
        decode_image(data)
    assert decoded == [], f"{name} was decoded ({decoded}) before it was refused"
    decode_image(normal)
    assert "PNG" in decoded  # the count sees a decode


def test_the_header_walks_pass_what_cameras_and_encoders_write():
    """The JPEG marker and GIF block walks refuse only what no encoder writes: every JPEG and GIF in ../shared/
    (camera photos with EXIF, ICC profiles, progressive files), an animated GIF with a comment and a loop count, a 12 MP
    GIF, JPEGs with an ICC profile, EXIF and a comment."""
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).convert("P") for _ in range(4)]
    made = [
        encode(frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0, duration=80, comment=b"made here"),
        encode(Image.fromarray(rng.integers(0, 255, (3000, 4000), dtype=np.uint8), "L").convert("P"), "GIF"),
        encode(gradient(), "JPEG", icc_profile=b"\0" * 200_000, exif=Image.Exif().tobytes(), comment=b"made here"),
        encode(gradient(), "JPEG", progressive=True, icc_profile=b"\0" * 100_000),
    ]
    for data in made:
        assert min(decode_image(data).size) >= 30
    shared = [p for p in SHARED.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".gif")]
    assert len(shared) > 500
    for path in shared:  # one is over the pixel limit: the walks alone
        refuse_before_open(io.BytesIO(path.read_bytes()))


def test_the_jpeg_walk_knows_the_markers_pillows_parser_knows():
    """check_jpeg_markers walks as Pillow's parser does: a marker it reads a length for must be one Pillow reads a
    length for (else the two walks part, and the bound holds for the wrong one)."""
    from PIL.JpegImagePlugin import MARKER

    from headstart.service.formats import JPEG_MARKERS, JPEG_MARKERS_WITHOUT_LENGTH

    assert set(MARKER) == set(range(JPEG_MARKERS[0], JPEG_MARKERS[1] + 1))
    assert {code for code, (_, _, handler) in MARKER.items() if handler is None} == JPEG_MARKERS_WITHOUT_LENGTH


@pytest.mark.parametrize("name", list(work_bombs()))
def test_decode_work_bombs_are_refused_before_decoding(name, monkeypatch):
    """Small files inside the allowed formats that cost seconds of Python decoding (RLE BMP, plain or 10-bit Netpbm,
    padded headers, thousands of PNG chunks or ICC profiles) or a gigabyte (64 MP lossless WebP or RGBA PNG):
    refused from the header, before a pixel is decoded."""
    from PIL import ImageFile

    data, _, message = work_bombs()[name]
    decoded, load = [], ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.format) or load(self))
    with pytest.raises(ImageError, match=message):
        decode_image(data)
    assert decoded == [], f"{name} was decoded ({decoded}) before it was refused"


def test_legitimate_images_near_the_new_limits_still_decode():
    """What the work limits must keep taking: PNG with an ICC profile and text, with its data in 8 KB IDAT chunks,
    binary PBM/PGM/PPM (8 and 16 bit, with a comment), and a 64 MP RGB PNG."""
    base = photo().resize((300, 200))
    icc = encode(base, "PNG", icc_profile=b"\0" * 3000)
    text = encode(base, "PNG")
    text = text[:33] + b"".join(png_chunk(b"tEXt", b"k%d\0v" % i) for i in range(50)) + text[33:]
    many_idat = Image.new("RGB", (2000, 2000))
    many_idat.putdata([(i % 251, i % 13, 0) for i in range(2000 * 2000)])
    from PIL import PngImagePlugin

    old, PngImagePlugin.ImageFile.MAXBLOCK = PngImagePlugin.ImageFile.MAXBLOCK, 8192  # 8 KB IDAT chunks
    try:
        idat = encode(many_idat, "PNG", compress_level=0)
    finally:
        PngImagePlugin.ImageFile.MAXBLOCK = old
    assert idat.count(b"IDAT") > 1000
    netpbm = [
        encode(base.convert("1"), "PPM"),
        encode(base.convert("L"), "PPM"),
        encode(base, "PPM"),
        b"P5\n# a comment\n300 200\n65535\n" + b"\x01\x02" * 60000,
    ]
    for data in [icc, text, idat, *netpbm, encode(Image.new("RGB", (8000, 8000)), "PNG")]:
        assert min(decode_image(data).size) >= 200


MEASURE = """
import io, sys
from PIL import Image
sys.path.insert(0, ".")
from headstart.service.formats import allowed_formats, decode_cost
from headstart.service.preprocess import decode_image
data = sys.stdin.buffer.read()
img = Image.open(io.BytesIO(data), formats=allowed_formats())
estimate = decode_cost(img, img.size[0] * img.size[1])
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from here
base = status("VmRSS:")
decode_image(data)
print(estimate, status("VmHWM:") - base)
"""


@pytest.mark.parametrize(
    "fmt, mode",
    [
        ("WEBP", "RGB"),
        ("PNG", "RGBA"),
        ("PNG", "RGB"),
        ("PNG", "L"),
        ("PNG", "I;16"),
        ("TIFF", "CMYK"),
        ("GIF", "P"),
        ("BMP", "RGB"),
        ("AVIF", "RGB"),
        ("AVIF", "RGBA"),
        ("HEIF", "RGB"),
        ("HEIF", "RGBA"),
    ],
)
def test_the_decode_memory_estimate_bounds_the_real_peak(fmt, mode):
    """The estimate that refuses an image before decoding (HEADSTART_MAX_DECODE_BYTES) is at least the memory its
    decoding really takes at its peak (within 5%: pages and allocator slack), measured in a fresh process on a 16 MP
    image of each kind, and not more than twice it (an estimate that refused what fits would refuse good photos)."""
    if fmt not in allowed_formats():
        pytest.skip(f"this installation does not read {fmt} (AVIF: Pillow 11.3; HEIF: pip install pillow-heif)")
    img = Image.new("RGB", (4000, 4000), (10, 200, 30))
    img = img.convert("L").convert("I;16") if mode == "I;16" else img.convert(mode)
    if fmt in ("AVIF", "HEIF") and mode == "RGBA":  # an opaque alpha plane is not stored: make half transparent
        pixels = np.asarray(img).copy()
        pixels[:2000, :, 3] = 0
        img = Image.fromarray(pixels)
    data = encode(img, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    out = subprocess.run([sys.executable, "-c", MEASURE], input=data, capture_output=True, check=True).stdout
    estimate, peak = map(int, out.split())
    assert peak <= 1.05 * estimate <= max(2 * peak, 16_000_000 * 5), (fmt, mode, estimate >> 20, peak >> 20)


MEASURE_AS_DECODED = """
import sys
sys.path.insert(0, ".")
import headstart.service.preprocess as pp
estimates, real = [], pp.decode_cost
pp.decode_cost = lambda *args: estimates.append(real(*args)) or estimates[-1]  # the estimate decode_image makes
data = sys.stdin.buffer.read()
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from here
base = status("VmRSS:")
pp.decode_image(data, min_side=int(sys.argv[1]) or None)
print(estimates[0], status("VmHWM:") - base)
"""


def jpeg_16mp(mode: str = "RGB", **options) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (250, 250, 3), np.uint8)).resize((4000, 4000), Image.Resampling.BILINEAR)
    return encode(img.convert(mode), "JPEG", quality=90, **options)


@pytest.mark.parametrize(
    "kind, mode, options",
    [
        ("progressive 4:4:4", "RGB", {"progressive": True, "subsampling": 0}),
        ("progressive 4:2:0", "RGB", {"progressive": True}),
        ("progressive CMYK", "CMYK", {"progressive": True}),
        ("progressive grey", "L", {"progressive": True}),
        ("baseline 4:2:0", "RGB", {}),
    ],
)
@pytest.mark.parametrize("min_side", [0, 512])  # decoded whole; at 1/4 scale, as a 224 px model decodes it
def test_the_decode_memory_estimate_bounds_a_jpegs_real_peak_at_any_scale(kind, mode, options, min_side):
    """libjpeg reads every scan of a progressive JPEG into a coefficient buffer of the stored size (2 bytes per
    coefficient) before it scales anything: a 64 MP one decoded at 1/8 scale takes 195-500 MiB, not the 12 MiB of
    its baseline twin. The estimate by which decode_image refuses an image counts them: at least the peak measured in a
    fresh process (within 5%), at most twice it, whole and at a reduced scale."""
    data = jpeg_16mp(mode, **options)
    out = subprocess.run(
        [sys.executable, "-c", MEASURE_AS_DECODED, str(min_side)], input=data, capture_output=True, check=True
    ).stdout
    estimate, peak = map(int, out.split())
    assert peak <= 1.05 * estimate <= max(2 * peak, 16_000_000 * 5), (kind, min_side, estimate >> 20, peak >> 20)


def test_a_progressive_jpeg_over_the_memory_limit_is_refused_with_what_to_do():
    progressive, baseline = jpeg_16mp(progressive=True, subsampling=0), jpeg_16mp(subsampling=0)
    limit = 64 << 20  # 16 MP of 4:4:4 coefficients: 92 MiB at any scale; its baseline twin at 1/4 scale: 16 MiB
    assert decode_image(baseline, min_side=512, max_bytes=limit).size == (1000, 1000)
    with pytest.raises(ImageError, match=r"4000x4000 progressive JPEG \(RGB\).*about \d+ MiB.*baseline"):
        decode_image(progressive, min_side=512, max_bytes=limit)
    assert decode_image(progressive, min_side=512, max_bytes=128 << 20).size == (1000, 1000)


def test_a_normal_progressive_jpeg_is_within_the_scan_budget():
    data = encode(photo(), "JPEG", progressive=True)
    assert 2 <= count_jpeg_scans(io.BytesIO(data)) <= 12
    decode_image(data)


def test_16bit_conversion_is_exact_and_banded():
    values = np.arange(0, 65536, dtype=np.uint16).reshape(256, 256)
    out = np.asarray(to_rgb(Image.fromarray(values)))[..., 0]
    assert np.array_equal(out, np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8))


def test_crop_box_resize_samples_the_same_pixels_as_resize_then_crop():
    """Preprocessing resamples only the crop box (memory bounded by the output), the same centre crop as resizing
    the whole image first: within rounding (1 level) for bilinear on real photos, any shape."""
    for size in [(500, 375), (375, 500), (3000, 40), (40, 3000), (257, 256)]:
        img = photo().resize(size)
        spec = PreprocessSpec()
        new_w, new_h = resized_size(img.size, spec)
        left, top = (new_w - 224) // 2, (new_h - 224) // 2
        whole = img.resize((new_w, new_h), Image.Resampling.BILINEAR).crop((left, top, left + 224, top + 224))
        diff = np.abs(np.asarray(resize_and_crop(img, spec), np.int16) - np.asarray(whole, np.int16))
        assert diff.max() <= 1, size


# ---------------------------------------------------------------- decoding bounded by the output (decode_for)


def large_jpeg(size=(3264, 2448), orientation: int | None = None, box=(1200, 700, 1500, 1000)) -> bytes:
    """A smooth large JPEG with a white square at ``box`` (in the upright image); with ``orientation`` 6 stored
    sideways as a phone stores a portrait photo."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 100, (size[1] // 100, size[0] // 100, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)
    img.paste((255, 255, 255), box)
    exif = Image.Exif()
    if orientation == 6:
        img = img.transpose(Image.Transpose.ROTATE_90)  # EXIF 6 turns it back upright
        exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


def test_a_large_jpeg_is_decoded_at_the_smallest_scale_the_model_needs():
    spec = PreprocessSpec()  # resize 256: a shorter side of 2 x 256 is kept
    img = decode_for(large_jpeg(), spec)  # an 8 MP phone photo
    assert img.size == (816, 612) and original_size(img) == (3264, 2448)  # 1/4: 1/8 would leave 306
    whole = decode_image(large_jpeg())
    assert whole.size == original_size(whole) == (3264, 2448)
    diff = np.abs(preprocess(img, spec) - preprocess(whole, spec))
    assert diff.mean() < 1.0 and diff.max() < 40  # the same picture; libjpeg's scaling instead of Pillow's resize
    assert decode_for(large_jpeg(size=(1000, 600)), spec).size == (1000, 600)  # 1/2 would leave 300 < 512


def test_exif_orientation_is_applied_after_the_reduced_decoding():
    img = decode_for(large_jpeg(orientation=6), PreprocessSpec())
    assert img.size == (816, 612) and original_size(img) == (3264, 2448)
    arr = np.asarray(img)
    assert arr[700 // 4 + 30, 1200 // 4 + 30].min() > 240  # the white square where it is in the upright photo


def test_other_formats_are_reduced_once_decoded_and_truncated_jpegs_are_still_caught():
    """Pillow has no reduced decoding but for JPEG: a large image of another format is decoded whole, then reduced by
    the largest whole factor that keeps twice the JPEG's margin (box averages), so that what is held and resized
    afterwards is bounded by the output; the model's input barely changes."""
    spec = PreprocessSpec()  # resize 256: a JPEG keeps a shorter side of at least 512, the others 1024
    whole = photo().resize((3200, 2400), Image.Resampling.BICUBIC)
    png = encode(whole, "PNG")
    img = decode_for(png, spec)
    assert img.size == (1600, 1200) and original_size(img) == (3200, 2400)
    assert np.array_equal(np.asarray(img), np.asarray(whole.reduce(2)))
    diff = np.abs(preprocess(img, spec) - preprocess(decode_image(png), spec))
    assert diff.mean() < 1 and diff.max() <= 4, (diff.mean(), diff.max())  # measured 0.21 and 2
    small = encode(whole.resize((2800, 2047)), "PNG")  # 2047 < 2 x 1024: kept as it is
    assert decode_for(small, spec).size == (2800, 2047)
    data = large_jpeg()
    with pytest.raises(ImageError, match="truncated"):
        decode_image(data[: len(data) // 2], min_side=1)  # 1/8 scale still decodes every byte


def test_boxes_of_a_reduced_decoding_come_back_in_the_photos_pixels():
    from headstart.service.localize import draw_detections, geometry_of

    for fit in ("crop", "pad"):
        spec = PreprocessSpec(input_size=224, resize=256 if fit == "crop" else 224, fit=fit)
        img = decode_for(large_jpeg(orientation=6), spec)
        arr = preprocess(img, spec)[0]
        ys, xs = np.nonzero(arr > 178)  # the square's edge, halfway between the background (< 100) and white
        found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], float)
        # within one input pixel (14.6 px of the photo at 224 px letterboxed)
        np.testing.assert_allclose(geometry_of(img, spec).to_original(found)[0], [1200, 700, 1500, 1000], atol=15)
    box = {"x1": 1200, "y1": 700, "x2": 1500, "y2": 1000}
    drawn = draw_detections(img, [{"label": "x", "index": 0, "confidence": 0.9, "box": box}])
    assert drawn.size == img.size  # drawn at the scale decoded, the box scaled to it
    x, y = round(1200 * img.width / 3264), round(850 * img.height / 2448)  # on the box's left edge
    assert np.asarray(drawn)[y, x].tolist() != np.asarray(img)[y, x].tolist()


# ---------------------------------------------------------------- phone formats: HEIC and AVIF


@pytest.mark.parametrize("fmt", ["AVIF", "HEIF"])
@pytest.mark.parametrize("orientation", [6, 3])
def test_heic_and_avif_photos_are_read_upright_with_the_jpegs_pixels(fmt, orientation):
    """A HEIC (iPhones' format, read through pillow-heif, which applies the file's rotation itself) or an AVIF
    (Pillow, which leaves it to the EXIF orientation) stored turned, as a phone stores a photo taken turned, is read
    upright at its shown size with the photo's pixels (lossy codecs: within a few levels on average; the wrong turn
    is off by about 50). A photo this small is not reduced after decoding: :func:`decode_for` gives the same image."""
    if fmt not in allowed_formats():
        pytest.skip(f"this installation does not read {fmt}")
    bee = photo()  # 500 x 375: a quarter turn shows in the size, a half turn in the pixels
    turn = {6: Image.Transpose.ROTATE_90, 3: Image.Transpose.ROTATE_180}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(bee.transpose(turn), fmt, exif=exif.tobytes(), quality=95)
    img = decode_image(data)
    assert img.mode == "RGB" and img.size == original_size(img) == bee.size
    diff = np.abs(np.asarray(img, np.int16) - np.asarray(bee, np.int16)).mean()
    wrong = np.abs(np.asarray(img.transpose(Image.Transpose.ROTATE_180), np.int16) - np.asarray(bee, np.int16))
    assert diff < 4 < wrong.mean(), (diff, wrong.mean())
    assert np.array_equal(np.asarray(decode_for(data, PreprocessSpec())), np.asarray(img))


def test_heic_and_avif_without_their_decoders_name_the_fix(monkeypatch):
    """Where pillow-heif is not installed (or Pillow reads no AVIF), such a photo is not "not an image": the error
    says what it is and how to read it; a folder scan reports it as unreadable, with that message, not as ignored."""
    import headstart.service.formats as formats

    heic = b"\0\0\0\x1cftypheic\0\0\0\0mif1heicmiaf" + b"\0" * 64  # an iPhone's ftyp box
    avif = b"\0\0\0\x20ftypavif\0\0\0\0avifmif1miafMA1B" + b"\0" * 64
    assert isobmff_brands(heic) == {b"heic", b"mif1", b"miaf"} and isobmff_brands(b"GIF89a" * 8) == set()
    monkeypatch.setattr(formats, "_formats", BASE_FORMATS)
    with pytest.raises(ImageError, match=r"HEIC/HEIF .* pip install pillow-heif"):
        decode_image(heic)
    with pytest.raises(ImageError, match=r"AVIF, which this installation's Pillow cannot read: pip install -U"):
        decode_image(avif)
    with pytest.raises(ImageError, match=r"\(JPEG, PNG, GIF, BMP, TIFF, WebP, PPM/PGM are\)"):
        decode_image(b"not an image at all" * 4)


def test_a_folder_scan_takes_heic_and_avif_and_reports_them_where_unreadable(tmp_path, monkeypatch):
    import headstart.service.formats as formats
    from headstart.data import check_file

    photos = phone_formats(photo())
    if len(photos) < 2:
        pytest.skip("this installation reads neither HEIC nor AVIF")
    for name, (data, _) in photos.items():
        (tmp_path / f"IMG_0001.{name.upper()}").write_bytes(data)
    assert [check_file(p)[0] for p in sorted(tmp_path.iterdir())] == ["ok", "ok"]
    monkeypatch.setattr(formats, "_formats", BASE_FORMATS)
    status, reason = check_file(tmp_path / "IMG_0001.HEIC")
    assert status == "corrupt" and "pip install pillow-heif" in reason


def test_a_heif_whose_main_image_is_not_a_picture_or_grid_is_refused_before_decoding():
    """iPhones store a photo as a grid of HEVC tiles; a file whose main image is an overlay of others (which could
    repeat one large picture many times) is refused from its item list, before libheif parses it."""
    if "HEIF" not in allowed_formats():
        pytest.skip("this installation does not read HEIF")
    bee = photo()
    tiled = encode(bee, "HEIF", quality=60, tile_size=128)  # a grid of 4 x 3 tiles, as iPhones write (512 px)
    assert decode_image(tiled).size == bee.size and b"grid" in tiled[:4096]
    at = tiled.index(b"infe") + 12  # the first item's type (version 2: id and protection index before it)
    assert tiled[at : at + 4] == b"grid"  # the main image (pitm: item 1)
    overlay = tiled[:at] + b"iovl" + tiled[at + 4 :]
    with pytest.raises(ImageError, match="main image is of type 'iovl'"):
        decode_image(overlay)
