"""What reading a request costs the guard, by the way the image is sent: a multipart form, the image as the body,
JSON with the image in base64.

In process, on the guard's own functions (``service.multipart.parse_upload`` and the canonical body rebuilt from its
parts, as ``service/guard.py`` does for every model request), for the shared camera photos (full size, 0.4-0.8 MB)
and hymenoptera photos (about 0.1 MB); the median of --repeats, the three ways alternated photo by photo. Beside them,
for scale, the photo's decoding and preprocessing (``decode_for`` + ``preprocess``, what every way costs after).
Prints milliseconds per request, per MB of image, and JSON's cost over the form's.

    .venv/bin/python benchmarks/request_bodies.py [--repeats 21]
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import time

from _common import SHARED, check_idle, machine_line

from headstart.service.guard import ENDPOINTS
from headstart.service.multipart import canonical_multipart, parse_upload
from headstart.service.preprocess import PreprocessSpec, decode_for, preprocess

BOUNDARY = b"----headstart-benchmark-boundary"


def bodies(data: bytes) -> dict[str, tuple[bytes, bytes]]:
    """(Content-Type, body) of a /classify request with ``data`` and top_k=3, each way."""
    form = b"".join(
        [
            b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="image"; filename="photo.jpg"\r\n',
            b"Content-Type: image/jpeg\r\n\r\n" + data + b"\r\n",
            b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n3\r\n',
            b"--" + BOUNDARY + b"--\r\n",
        ]
    )
    doc = json.dumps({"image": base64.b64encode(data).decode(), "top_k": 3}).encode()
    return {
        "form": (b"multipart/form-data; boundary=" + BOUNDARY, form),
        "image body": (b"image/jpeg", data),
        "JSON base64": (b"application/json", doc),
    }


def read(ctype: bytes, body: bytes, query: bytes) -> float:
    started = time.perf_counter()
    canonical_multipart(parse_upload(ctype, body, ENDPOINTS["/classify"], query))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    print(machine_line(torch=False))
    check_idle()
    sets = {
        "camera": sorted((SHARED / "photos" / "camera").glob("*.jpg")),
        "hymenoptera": sorted((SHARED / "data" / "hymenoptera" / "val" / "bees").glob("*.jpg"))[:20],
    }
    spec = PreprocessSpec()
    print(f"spec: resize {spec.resize}, input {spec.input_size}; median of {args.repeats} per photo")
    for name, paths in sets.items():
        times: dict[str, list[float]] = {}
        megabytes = []
        for path in paths:
            data = path.read_bytes()
            megabytes.append(len(data) / 1e6)
            ways = bodies(data)
            per: dict[str, list[float]] = {w: [] for w in (*ways, "decode + preprocess")}
            for _ in range(args.repeats):
                for way, (ctype, body) in ways.items():
                    per[way].append(read(ctype, body, b"top_k=3" if way == "image body" else b""))
                started = time.perf_counter()
                preprocess(decode_for(path, spec), spec)
                per["decode + preprocess"].append(time.perf_counter() - started)
            for way, values in per.items():
                times.setdefault(way, []).append(statistics.median(values))
        mb = statistics.mean(megabytes)
        print(f"\n{name}: {len(paths)} photos, {mb:.2f} MB on average")
        print("| way | ms per request | ms per MB of image |")
        print("|---|---|---|")
        for way, values in times.items():
            ms = 1000 * statistics.mean(values)
            print(f"| {way} | {ms:.2f} | {ms / mb:.2f} |")
        form, doc = statistics.mean(times["form"]), statistics.mean(times["JSON base64"])
        decode = statistics.mean(times["decode + preprocess"])
        print(
            f"JSON over the form: +{1000 * (doc - form):.2f} ms a request ({doc / form:.1f}x the form's reading), "
            f"{(doc - form) / decode:.0%} of the photo's decode + preprocess"
        )


if __name__ == "__main__":
    main()
