"""Where the images to predict come from: a file whose name looks like a glob, an http(s) URL (and what the web
answers instead of an image), a folder URI of pyarrow's file systems."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from headstart.service.files import FileProblem, image_paths, read_image, read_image_url
from tests.conftest import HYMENOPTERA

ANT = sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[0]
BEE = sorted((HYMENOPTERA / "val" / "bees").iterdir())[0]


def test_a_file_named_like_a_glob_is_that_file(tmp_path):
    """`headstart predict MODEL "photo [1].jpg"` said "names no images": the name was read as a glob (whose
    [1] matches "photo 1.jpg"), and a URL with ?w=100 as one that matched nothing."""
    for name in ("photo [1].jpg", "what?.jpg", "star*.jpg"):
        shutil.copy(ANT, tmp_path / name)
        assert image_paths(str(tmp_path / name)) is None  # a file: itself
    assert image_paths("https://example.com/a.jpg?w=100") is None
    assert image_paths(str(tmp_path / "photo [[]1].jpg")) == [str(tmp_path / "photo [1].jpg")]  # a glob still is one
    assert image_paths(str(tmp_path / "*.jpg")) == sorted(str(p) for p in tmp_path.glob("*.jpg"))


def test_an_image_url_is_read_and_what_the_web_gives_instead_is_named(image_server):
    assert read_image(f"{image_server}/photos/val/ants/{ANT.name}") == ANT.read_bytes()
    assert read_image_url(f"{image_server}/moved") == BEE.read_bytes()  # redirects followed
    with pytest.raises(FileProblem, match="The server answered 404"):
        read_image_url(f"{image_server}/photos/val/ants/missing.jpg")
    with pytest.raises(FileProblem, match=r"gives text/html, not an image.*image's own address"):
        read_image_url(f"{image_server}/page")
    with pytest.raises(FileProblem, match=r"The file is 1048576 MiB, more than the 1 MiB") as caught:
        read_image_url(f"{image_server}/huge", max_bytes=1 << 20)  # refused by its Content-Length
    assert caught.value.too_large
    with pytest.raises(FileProblem, match=r"more than the 8 MiB"):
        read_image_url(f"{image_server}/endless", max_bytes=8 << 20)  # no length said: stopped past the limit
    start = time.monotonic()
    with pytest.raises(FileProblem, match=r"did not arrive within 2 s \(HEADSTART_URL_TIMEOUT\)"):
        read_image_url(f"{image_server}/slow", timeout=2)  # a byte a second: each read in time, the whole not
    assert time.monotonic() - start < 10
    closed = image_server.rsplit(":", 1)[0] + ":1"  # nothing listens on port 1
    with pytest.raises(FileProblem, match=r"The URL cannot be read: Connection refused\. Check it, the network"):
        read_image_url(f"{closed}/x.jpg")
    with pytest.raises(FileProblem, match="The URL cannot be read"):
        read_image_url("http://[::1/x.jpg")  # not a valid URL
    with pytest.raises(FileProblem, match=r"This is a URL, not a file on this machine.*Download it first"):
        read_image("s3://bucket/photo.jpg")  # only predict-batch opens pyarrow's file systems


def test_predict_answers_urls_as_it_answers_their_files(tiny_bundle, image_server, tmp_path, capsys):
    import json

    import headstart
    from headstart.cli import main

    shutil.copy(ANT, tmp_path / "ant [1].jpg")
    url = f"{image_server}/photos/val/ants/{ANT.name}?size=large"
    model = headstart.load(tiny_bundle.bundle_dir)
    local, remote, bracketed, missing, page = model.predict(
        [str(ANT), url, str(tmp_path / "ant [1].jpg"), f"{image_server}/photos/nothing.jpg", f"{image_server}/page"],
        heatmaps=tmp_path / "maps",
    )
    assert remote.image == url and remote.error is None
    assert remote.predictions == local.predictions == bracketed.predictions and remote.novelty == local.novelty
    assert remote.heatmap == str(tmp_path / "maps" / f"{ANT.stem}-2.heatmap.jpg")  # named from the URL's path
    assert "404" in missing.error and "text/html" in page.error
    assert main(["predict", str(tiny_bundle.bundle_dir), url, str(tmp_path / "ant [1].jpg"), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == [url, str(tmp_path / "ant [1].jpg")]
    assert lines[0]["predictions"] == lines[1]["predictions"]


def test_a_folder_uri_is_listed_and_its_files_read(tmp_path):
    pytest.importorskip("pyarrow")
    from headstart.service.batch import BatchError, list_sources, read_bytes

    (tmp_path / "photos" / "my trip").mkdir(parents=True)
    shutil.copy(ANT, tmp_path / "photos" / "my trip" / "ant 1.jpg")
    shutil.copy(BEE, tmp_path / "photos" / "bee.JPG")
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    listed = list_sources(f"file://{tmp_path}/photos/")
    assert listed == [f"file://{tmp_path}/photos/bee.JPG", f"file://{tmp_path}/photos/my%20trip/ant%201.jpg"]
    assert list_sources(f"file://{tmp_path}/photos") == listed
    assert read_bytes(listed[1]) == ANT.read_bytes()
    assert read_bytes(f"file://{tmp_path}/photos/my trip/ant 1.jpg") == ANT.read_bytes()  # written unescaped
    assert list_sources(f"file://{tmp_path}/photos/bee.JPG") == [f"file://{tmp_path}/photos/bee.JPG"]
    with pytest.raises(BatchError, match="no such file or folder"):
        list_sources(f"file://{tmp_path}/elsewhere/")
    with pytest.raises(BatchError, match=r"cannot be listed.*s3://, gs://"):
        list_sources("nosuchfs://bucket/photos/")
    with pytest.raises(FileProblem, match="folder, not a file"):
        read_bytes(f"file://{tmp_path}/photos")
    with pytest.raises(FileProblem, match="does not exist"):
        read_bytes(f"file://{tmp_path}/photos/missing.jpg")
    with pytest.raises(FileProblem, match="Unrecognized filesystem.*http\\(s\\) URLs"):
        read_bytes("nosuchfs://bucket/x.jpg")


def test_urls_are_read_on_more_threads_than_files(tiny_bundle, image_server, monkeypatch):
    """A list of URLs was read on one thread per CPU, each waiting on its server in turn (a round trip per image):
    now on URL_THREADS, as many requests in flight (answers in order all the same)."""
    import headstart
    from headstart.service import ahead

    monkeypatch.setattr(ahead, "default_threads", lambda: 2)
    assert ahead.reading_threads(["a.jpg", "b.png"]) == 2 and ahead.reading_threads(["a.jpg"], threads=1) == 1
    assert ahead.reading_threads(["a.jpg", "https://host/b.jpg"]) == ahead.URL_THREADS >= 8
    assert ahead.reading_threads(["s3://bucket/b.jpg"], threads=1) == ahead.URL_THREADS
    photos = sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[:12]
    urls = [f"{image_server}/later/photos/val/ants/{p.name}" for p in photos]
    answers = headstart.load(tiny_bundle.bundle_dir).predict(urls)
    assert [a.image for a in answers] == urls and not any(a.error for a in answers)
    assert image_server.most_at_once >= 8  # 1 s each: read together, not one after another


def test_predict_takes_a_txt_list_of_images_as_predict_batch_does(tiny_bundle, image_server, tmp_path, capsys):
    """`headstart predict MODEL list.txt` answered "list.txt: error: not an image": a list of thousands of paths or
    URLs had to go through the shell's command line."""
    from headstart.cli import main

    shutil.copy(ANT, tmp_path / "ant [1].jpg")
    url = f"{image_server}/photos/val/ants/{ANT.name}"
    listing = tmp_path / "list.txt"
    listing.write_text(
        f"# the photos to check\n{ANT}\n\n  {tmp_path / 'ant [1].jpg'}\n{url}\n{tmp_path / 'gone.jpg'}\n"
    )
    assert main(["predict", str(tiny_bundle.bundle_dir), str(listing), str(BEE), "--json"]) == 1  # 1: one failed
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == [
        str(ANT),
        str(tmp_path / "ant [1].jpg"),
        url,
        str(tmp_path / "gone.jpg"),
        str(BEE),
    ]
    assert lines[0]["predictions"] == lines[1]["predictions"] == lines[2]["predictions"]
    assert "does not exist" in lines[3]["error"] and "error" not in lines[4]


def test_predict_takes_a_csv_list_of_images_as_predict_batch_does(tiny_bundle, tmp_path, capsys):
    """`headstart predict MODEL photos.csv` answered "photos.csv: error: not an image format" while `predict-batch`
    read the same table: its `path` column (or `image`, `url`, ..., else the first), quoted cells, Excel's
    semicolons; a row without the cell stops with its line."""
    import headstart
    from headstart.cli import main

    shutil.copy(ANT, tmp_path / "ant, the first.jpg")
    table = tmp_path / "photos.csv"
    table.write_text(f'id,image,note\n1,"{tmp_path / "ant, the first.jpg"}",x\n2,{BEE},\n3,,empty\n')
    assert main(["predict", str(tiny_bundle.bundle_dir), str(table), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == [str(tmp_path / "ant, the first.jpg"), str(BEE)]
    excel = tmp_path / "excel.csv"
    excel.write_text(f"path;id\n{BEE};1\n", encoding="utf-8-sig")  # a semicolon table with a byte-order mark
    answers = headstart.load(tiny_bundle.bundle_dir).predict(str(excel))
    assert [a.image for a in answers] == [str(BEE)]
    assert [p.model_dump() for p in answers[0].predictions] == lines[1]["predictions"]
    short = tmp_path / "short.csv"
    short.write_text(f"id,path\n1,{BEE}\n2\n")
    assert main(["predict", str(tiny_bundle.bundle_dir), str(short)]) == 2
    assert "short.csv, line 3: the row has no 'path' cell (column 2)" in capsys.readouterr().err


def test_relative_paths_in_a_list_are_found_beside_it_when_not_from_here(tiny_bundle, tmp_path, monkeypatch):
    """A list written next to its images (`test/1.jpg` in `data/list.csv`, as Kaggle's tables are) read from another
    folder answered "does not exist" for every row. A relative path that names no file from here is read beside the
    list; one that does is read as before (and shown as written), as are absolute paths and URLs."""
    from headstart.service.batch import list_sources
    from headstart.service.files import listed_images, table_images

    (tmp_path / "data" / "test").mkdir(parents=True)
    (tmp_path / "here").mkdir()
    shutil.copy(ANT, tmp_path / "data" / "test" / "1.jpg")
    shutil.copy(BEE, tmp_path / "here" / "2.jpg")
    (tmp_path / "data" / "list.csv").write_text(f"path\ntest/1.jpg\n2.jpg\ngone.jpg\n{BEE}\nhttps://x.example/3.jpg\n")
    (tmp_path / "data" / "list.txt").write_text("test/1.jpg\n2.jpg\ngone.jpg\n")
    monkeypatch.chdir(tmp_path / "here")
    beside = str(tmp_path / "data" / "test" / "1.jpg")
    assert table_images(tmp_path / "data" / "list.csv") == [
        beside,
        "2.jpg",
        "gone.jpg",
        str(BEE),
        "https://x.example/3.jpg",
    ]
    assert listed_images(tmp_path / "data" / "list.txt") == [beside, "2.jpg", "gone.jpg"]
    assert list_sources(str(tmp_path / "data" / "list.txt")) == [beside, "2.jpg", "gone.jpg"]
    # Windows' lists: Notepad's byte-order mark was part of the first path ("does not exist"); PowerShell 5's
    # `dir -Name > list.txt` is UTF-16, which gave no path at all
    for encoding in ("utf-8-sig", "utf-16", "utf-16-be"):
        mark = "\ufeff" if encoding == "utf-16-be" else ""  # the others write their own
        (tmp_path / "data" / "win.txt").write_bytes(f"{mark}test/1.jpg\r\n2.jpg\r\n".encode(encoding))
        assert listed_images(tmp_path / "data" / "win.txt") == [beside, "2.jpg"], encoding
        (tmp_path / "data" / "win.csv").write_bytes(f"{mark}path;score\r\ntest/1.jpg;1\r\n2.jpg;2\r\n".encode(encoding))
        assert table_images(tmp_path / "data" / "win.csv") == [beside, "2.jpg"], encoding
    import headstart

    answers = headstart.load(tiny_bundle.bundle_dir).predict(str(tmp_path / "data" / "list.txt"))  # no URL read
    assert [a.image for a in answers] == [beside, "2.jpg", "gone.jpg"]
    assert [bool(a.error) for a in answers] == [False, False, True] and "does not exist" in answers[2].error


def test_predict_reads_an_image_or_a_list_from_standard_input(tiny_bundle, tmp_path, monkeypatch, capsys):
    """`curl -s URL | headstart predict MODEL -` and `find photos -name '*.jpg' | headstart predict MODEL -`: '-'
    was a file that does not exist. Standard input is the image's bytes, or (text) a list of images, or names ended
    by NUL bytes (find -print0); the answers are the files' own."""
    import io

    from headstart.cli import main

    def stdin(data: bytes):
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))

    model = str(tiny_bundle.bundle_dir)
    assert main(["predict", model, str(ANT), str(BEE), "--json"]) == 0
    files = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    stdin(ANT.read_bytes())
    assert main(["predict", model, "-", str(BEE), "--json"]) == 0
    piped = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert piped[0]["image"] == "-" and piped[0]["predictions"] == files[0]["predictions"]
    assert piped[1] == files[1]
    stdin(f"{ANT}\r\n\n# a comment\n{BEE}\n".encode())  # a list, with a Windows line end
    assert main(["predict", model, "-", "--json"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == files
    stdin(f"{ANT}\0{BEE}\0".encode())  # find -print0
    assert main(["predict", model, "-", "--json"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == files
    for data, said in [
        (b"", "Standard input ('-') is empty"),
        (b"\n\n", "Standard input ('-') is empty"),
        (b"# nothing yet\n", "Standard input ('-') lists no images"),
    ]:
        stdin(data)
        assert main(["predict", model, "-"]) == 2
        assert said in capsys.readouterr().err
    stdin(b"x")
    assert main(["predict", model, "-", "-"]) == 2
    assert "'-' (standard input) can be given once" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", type("Terminal", (), {"isatty": staticmethod(lambda: True)})())
    assert main(["predict", model, "-"]) == 2
    assert "nothing is piped into it" in capsys.readouterr().err
