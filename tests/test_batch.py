"""`headstart predict-batch` on Ray Data: the same answers as `headstart predict`, error rows instead of failures,
spread over a (simulated) two-node cluster, and resumable after SIGKILL with the same final output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

from headstart.open_set import NOVELTY_TOLERANCE  # noqa: E402
from headstart.service.batch import predict_batch  # noqa: E402
from tests.conftest import HYMENOPTERA, ROOT  # noqa: E402


@pytest.fixture
def local_ray():
    yield
    ray.shutdown()


def source_list(tmp_path, n: int = 12) -> tuple[list[str], str]:
    """Real photos, a text file named .jpg and a path that does not exist, as a .txt list."""
    images = [str(p) for p in sorted((HYMENOPTERA / "val").rglob("*.jpg"))[:n]]
    (tmp_path / "fake.jpg").write_text("not an image")
    paths = [*images[: n // 2], str(tmp_path / "fake.jpg"), str(tmp_path / "missing.jpg"), *images[n // 2 :]]
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(paths) + "\n")
    return paths, str(listing)


def read_output(out) -> list[dict]:
    return [row for part in sorted(out.glob("part-*.parquet")) for row in pq.read_table(part).to_pylist()]


def test_batch_answers_equal_predict_with_error_rows(tiny_bundle, tmp_path, capsys, local_ray):
    from headstart.cli import main

    paths, listing = source_list(tmp_path)
    summary = predict_batch(
        str(tiny_bundle.bundle_dir), listing, tmp_path / "out", top_k=2, part_size=5, batch_size=4, progress=False
    )
    assert summary["images"] == len(paths) and summary["parts"] == 3 and summary["errors"] == 2
    rows = read_output(tmp_path / "out")
    assert [r["path"] for r in rows] == paths  # every image once, in the listing's order
    assert main(["predict", str(tiny_bundle.bundle_dir), *paths, "--top-k", "2", "--json"]) == 1  # 1: some failed
    single = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for row, one in zip(rows, single, strict=True):
        assert row["model"] == tiny_bundle.manifest.name and row["version"] == tiny_bundle.manifest.version
        if "error" in one:
            assert row["error"] and not row["labels"]
            continue
        assert row["error"] is None
        assert row["labels"] == [p["label"] for p in one["predictions"]]
        assert max(abs(a - p["score"]) for a, p in zip(row["scores"], one["predictions"], strict=True)) <= 1e-5
        # the same runtime and precision, but other batch sizes: bf16 (where the export allowed it) differs a little
        assert abs(row["novelty"] - one["novelty"]) <= NOVELTY_TOLERANCE
        if abs(one["novelty"] - one["novelty_threshold"]) > NOVELTY_TOLERANCE:
            assert row["unknown"] is one["unknown"]
    assert all(r["novelty"] is None and r["unknown"] is None for r in rows if r["error"])


def test_batch_localize_boxes_equal_the_services(tiny_bundle, tmp_path, local_ray):
    from headstart.service.bundle import load_bundle
    from headstart.service.localize import LocalizeParams, localize_images
    from headstart.service.preprocess import decode_image

    images = [str(p) for p in sorted((HYMENOPTERA / "val").rglob("*.jpg"))[:6]]
    predict_batch(
        str(tiny_bundle.bundle_dir),
        str(HYMENOPTERA / "val" / "ants" / "*.jpg"),
        tmp_path / "out",
        localize=True,
        conf=0.05,
        novelty_threshold=2.0,  # nothing is "none of these" (the tiny model knows only synthetic shapes): boxes
        part_size=100,
        progress=False,
    )
    rows = {r["path"]: r for r in read_output(tmp_path / "out")}
    bundle = load_bundle(tiny_bundle.bundle_dir)
    for path in images[:3]:
        result = localize_images(bundle, [decode_image(path)], LocalizeParams(conf=0.05), threshold=2.0)[0]
        expected = result["detections"]
        got = json.loads(rows[path]["boxes"])
        assert expected and rows[path]["unknown"] is False
        assert abs(rows[path]["novelty"] - result["novelty"]) <= NOVELTY_TOLERANCE
        assert [d["label"] for d in got] == [d["label"] for d in expected]
        for a, b in zip(got, expected, strict=True):
            assert all(abs(a["box"][k] - b["box"][k]) <= 1e-3 for k in ("x1", "y1", "x2", "y2"))


@pytest.mark.parametrize("localize", [False, True])
def test_an_actor_answers_as_many_images_at_a_time_as_the_model_runs(tiny_bundle, tmp_path, monkeypatch, localize):
    """An actor held the pixels of every image of its batch (--batch-size: a detector's actor took 656 MB at 32
    images a call, 785 MB at 64): it now answers the images as they are decoded, as many at a time as the model runs
    at once, with the answers of the batch whole."""
    import numpy as np

    from headstart.service import runtime
    from headstart.service.batch import Predictor
    from headstart.service.bundle import load_bundle

    paths, _ = source_list(tmp_path, n=10)  # 10 photos, a text file named .jpg and a missing file among them
    bundle = load_bundle(tiny_bundle.bundle_dir)
    options = {"top_k": 2, "localize": localize, "conf": 0.05, "novelty_threshold": 2.0, "threads": 1}

    def actor() -> Predictor:  # as Ray starts one, without Ray
        made = object.__new__(Predictor)
        made.bundle, made.options, made.not_utf8, made.node = bundle, options, set(), "here"
        return made

    batch = {"path": np.array(paths), "part": np.zeros(len(paths), int), "index": np.arange(len(paths))}
    answered, answer = [], Predictor._answer
    monkeypatch.setattr(
        Predictor, "_answer", lambda self, rows, images: [answered.append(len(images)), answer(self, rows, images)]
    )
    whole = actor()(batch)
    assert answered == [10]  # a tiny model's images: all of them fit one run
    monkeypatch.setattr(runtime, "RUN_PIXELS", 3 * bundle.spec.input_size**2)
    answered.clear()
    parts = actor()(batch)
    assert bundle.images_per_run == 3 and answered == [3, 3, 3, 1]
    assert parts["path"] == whole["path"] == paths and parts["error"] == whole["error"]
    assert [bool(e) for e in parts["error"]] == [p.endswith(("fake.jpg", "missing.jpg")) for p in paths]
    for i in range(len(paths)):
        assert parts["labels"][i] == whole["labels"][i]
        assert all(abs(a - b) <= 1e-5 for a, b in zip(parts["scores"][i], whole["scores"][i], strict=True))
        if localize and not parts["error"][i]:
            got, expected = json.loads(parts["boxes"][i]), json.loads(whole["boxes"][i])
            assert got and [d["label"] for d in got] == [d["label"] for d in expected]
            for a, b in zip(got, expected, strict=True):
                assert all(abs(a["box"][k] - b["box"][k]) <= 1e-3 for k in ("x1", "y1", "x2", "y2"))


def test_batch_spreads_over_a_two_node_cluster_with_the_same_output(tiny_bundle, tmp_path):
    """Both nodes run an actor, whatever the machine's load: placement allows one actor per node (nodes of 2 CPUs,
    actors of 1.5: a second does not fit, and the CPU left is for Ray's own tasks), and Ray Data starts the whole
    pool before it hands out a block and gives each block to the least busy actor, not the one beside the data. (With
    two 0.5-CPU actors on 1-CPU nodes, one actor under load once took all 26 images before the other started.)"""
    from ray.cluster_utils import Cluster

    paths, listing = source_list(tmp_path, n=24)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    context = ray.data.DataContext.get_current()
    saved = context.wait_for_min_actors_s, context.execution_options.actor_locality_enabled
    context.wait_for_min_actors_s, context.execution_options.actor_locality_enabled = 300, False
    try:
        summary = predict_batch(
            str(tiny_bundle.bundle_dir),
            listing,
            tmp_path / "two",
            top_k=2,
            part_size=8,
            batch_size=2,
            actors=2,
            cpus_per_actor=1.5,
            ray_address=cluster.address,
            progress=False,
        )
    finally:
        context.wait_for_min_actors_s, context.execution_options.actor_locality_enabled = saved
        ray.shutdown()
        cluster.shutdown()
    assert len(summary["nodes"]) == 2, summary  # an actor on each node
    local = predict_batch(str(tiny_bundle.bundle_dir), listing, tmp_path / "one", top_k=2, part_size=8, progress=False)
    ray.shutdown()
    assert summary["errors"] == local["errors"] == 2
    two, one = read_output(tmp_path / "two"), read_output(tmp_path / "one")
    assert [(r["path"], r["labels"], r["error"] is None) for r in two] == [
        (r["path"], r["labels"], r["error"] is None) for r in one
    ]


def test_batch_killed_then_rerun_gives_the_same_output_without_duplicates(tiny_bundle, tmp_path):
    paths, listing = source_list(tmp_path, n=60)
    cmd = [
        sys.executable,
        "-m",
        "headstart.cli",
        "predict-batch",
        str(tiny_bundle.bundle_dir),
        listing,
        "--out",
        str(tmp_path / "out"),
        "--part-size",
        "6",
        "--batch-size",
        "2",
        "--top-k",
        "2",
        "--no-progress",
        "--json",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300  # Ray starting on a loaded 2-core machine can take minutes
    while time.time() < deadline and len(list((tmp_path / "out").glob("part-*.parquet"))) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray instance it started
    proc.wait()
    written = len(list((tmp_path / "out").glob("part-*.parquet")))
    assert 2 <= written < 11, written  # killed part-way
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads(again.stdout.splitlines()[-1])
    assert summary["parts_skipped"] >= written
    # Ray's own INFO and WARNING lines only with --verbose: nothing is left on stderr (but one error-level line
    # Ray's C++ core writes about actor constructor arguments on every job, ray-project/ray#57733); the summary is
    # the JSON line on stdout
    noise = [line for line in again.stderr.splitlines() if line.strip() and "core_worker.cc" not in line]
    assert noise == [], again.stderr[-2000:]
    rows = read_output(tmp_path / "out")
    assert [r["path"] for r in rows] == paths  # once each, in order
    reference = predict_batch(
        str(tiny_bundle.bundle_dir), listing, tmp_path / "ref", top_k=2, part_size=6, progress=False
    )
    ray.shutdown()
    assert reference["errors"] == summary["errors"] == 2
    assert [(r["labels"], r["error"] is None) for r in rows] == [
        (r["labels"], r["error"] is None) for r in read_output(tmp_path / "ref")
    ]


def test_another_job_in_the_same_folder_is_refused(tiny_bundle, tmp_path, local_ray):
    from headstart.service.batch import BatchError

    _, listing = source_list(tmp_path, n=4)
    predict_batch(str(tiny_bundle.bundle_dir), listing, tmp_path / "out", part_size=10, progress=False)
    with pytest.raises(BatchError, match="holds the output of another job"):
        predict_batch(str(tiny_bundle.bundle_dir), listing, tmp_path / "out", top_k=3, part_size=10, progress=False)


def test_sources_are_a_folder_a_glob_or_a_list_file(tmp_path):
    import pyarrow as pa

    from headstart.service.batch import BatchError, list_sources

    folder = tmp_path / "photos"
    (folder / "a").mkdir(parents=True)
    for name in ("a/1.jpg", "a/2.PNG", "3.webp", "notes.txt"):
        (folder / name).write_bytes(b"x")
    images = [str(folder / "3.webp"), str(folder / "a" / "1.jpg"), str(folder / "a" / "2.PNG")]
    assert list_sources(str(folder)) == sorted(images)  # recursive, by image suffix, sorted
    assert list_sources(str(folder / "**" / "*.jpg")) == [str(folder / "a" / "1.jpg")]
    (tmp_path / "list.txt").write_text("# a comment\n" + "\n".join(images) + "\n\ns3://bucket/x.jpg\n")
    assert list_sources(str(tmp_path / "list.txt")) == [*images, "s3://bucket/x.jpg"]
    (tmp_path / "list.csv").write_text("id,path\n1," + images[0] + "\n2," + images[1] + "\n")
    assert list_sources(str(tmp_path / "list.csv")) == images[:2]
    (tmp_path / "urls.csv").write_text("id,URL\n1," + images[0] + "\n")  # a table of URLs: its url column
    assert list_sources(str(tmp_path / "urls.csv")) == images[:1]
    (tmp_path / "excel.csv").write_text("id;path\n1;" + images[0] + "\n")  # Excel's CSV where 1,5 is a number
    assert list_sources(str(tmp_path / "excel.csv")) == images[:1]
    (tmp_path / "ragged.csv").write_text("path,id\n" + images[0] + ",1\n" + images[1] + "\n\n")  # short rows
    assert list_sources(str(tmp_path / "ragged.csv")) == images[:2]
    (tmp_path / "quoted.csv").write_text('"id","path"\n1,"' + images[0] + '"\n2,\n')  # quoted; an empty cell
    assert list_sources(str(tmp_path / "quoted.csv")) == images[:1]
    (tmp_path / "short.csv").write_text("id,path\n1," + images[0] + "\n2\n")
    with pytest.raises(BatchError, match=r"short.csv, line 3: the row has no 'path' cell \(column 2\)"):
        list_sources(str(tmp_path / "short.csv"))
    (tmp_path / "binary.csv").write_bytes(b"path\n" + b"\x01" * 200_000 + b"\n")  # over csv's field size limit
    with pytest.raises(BatchError, match=r"binary.csv, line 2: not a CSV this list can be read from"):
        list_sources(str(tmp_path / "binary.csv"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(BatchError, match=r"empty.csv is empty: a .csv list has a header row"):
        list_sources(str(tmp_path / "empty.csv"))
    pq.write_table(pa.table({"path": images}), tmp_path / "list.parquet")
    assert list_sources(str(tmp_path / "list.parquet")) == images
    (tmp_path / "torn.parquet").write_bytes((tmp_path / "list.parquet").read_bytes()[:-40])
    with pytest.raises(BatchError, match="torn.parquet cannot be read as a list of images"):
        list_sources(str(tmp_path / "torn.parquet"))
    with pytest.raises(BatchError, match="neither a folder, a glob"):
        list_sources(str(tmp_path / "nowhere"))
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(BatchError, match=r"must be \.txt, \.csv or \.parquet"):
        list_sources(str(tmp_path / "list.json"))


def test_urls_and_folder_uris_are_predicted_as_their_files(tiny_bundle, image_server, tmp_path, local_ray):
    """A list of http(s) URLs (a 404 and a web page among them: error rows) and a folder URI of pyarrow's file
    systems (file:// here; s3:// and gs:// go through the same listing) answer as the same files do."""
    import shutil

    import headstart

    ants = sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[:3]
    (tmp_path / "photos" / "my trip").mkdir(parents=True)
    for i, ant in enumerate(ants):
        shutil.copy(ant, tmp_path / "photos" / "my trip" / f"ant {i}.jpg")
    urls = [f"{image_server}/photos/val/ants/{ant.name}" for ant in ants]
    unescaped = f"file://{tmp_path}/photos/my trip/ant 0.jpg"
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join([*urls, f"{image_server}/missing.jpg", f"{image_server}/page", unescaped]) + "\n")
    model = str(tiny_bundle.bundle_dir)
    predict_batch(model, str(listing), tmp_path / "web", top_k=2, progress=False)
    predict_batch(model, f"file://{tmp_path}/photos/", tmp_path / "uri", top_k=2, progress=False)
    web, uri = read_output(tmp_path / "web"), read_output(tmp_path / "uri")
    assert [r["path"] for r in web] == [*urls, f"{image_server}/missing.jpg", f"{image_server}/page", unescaped]
    assert [r["path"] for r in uri] == [f"file://{tmp_path}/photos/my%20trip/ant%20{i}.jpg" for i in range(3)]
    assert "The server answered 404" in web[3]["error"] and "text/html, not an image" in web[4]["error"]
    expected = headstart.load(model).predict([str(a) for a in ants], top_k=2)
    for answer, by_url, by_uri in zip(expected, web[:3], uri, strict=True):
        for row in (by_url, by_uri):
            assert row["error"] is None and row["labels"] == [p.label for p in answer.predictions]
            assert row["scores"] == pytest.approx([p.score for p in answer.predictions], abs=1e-5)
    assert web[5]["labels"] == uri[0]["labels"] and web[5]["scores"] == uri[0]["scores"]
