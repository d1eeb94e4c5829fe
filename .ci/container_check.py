"""The CPU bento built into an OCI image, run, and checked from outside, with Debian's podman: the container check.

    sudo .venv/bin/python .ci/container_check.py --model TAG [--json OUT] [--keep]

``TAG`` is a headstart model in the BentoML store of ``BENTOML_HOME`` (``headstart export``). As root (rootful podman),
with podman, runc and mmdebstrap installed (Debian: ``apt-get install podman runc mmdebstrap``), it:

1. makes the base image the bento's Dockerfile starts from (``python:3.11-slim``), which no registry can provide
   here: a minimal rootfs of this machine's Debian release (mmdebstrap: python3, merged /usr, no docs or locales),
   this machine's CA bundle (package downloads inside the build verify against it), ``uv`` (configured for the
   system trust store), imported with ``podman import`` under that name;
2. builds the CPU bento (``bentofile.yaml``) and containerizes it, unedited, with ``bentoml containerize --backend
   podman`` (host network for the build; ``TMPDIR`` inside the working directory: BentoML 1.4 refuses a
   ``dockerfile_template`` it finds in its own temporary directory otherwise);
3. runs the image (runc, a private ``containers.conf``: podman's default ``nofile`` limit cannot be set in these
   VMs, crun refuses their hybrid cgroups) and `bentoml serve` of the same model from the checkout, and checks from
   outside: ``/readyz``; ``/classify`` and ``/localize`` on real photos give the answers of the checkout's server;
   ``/info`` names the model, runtime, device and precision; the service runs as a non-root user; no torch is
   installed; a SIGTERM (``podman stop``) ends it cleanly within :data:`STOP_SECONDS`;
4. removes every container and image it made (``--keep`` keeps the image), and its storage.

Every podman setting lives in a private folder (``CONTAINERS_CONF``, ``CONTAINERS_STORAGE_CONF``): ``/etc/containers``
is left alone. Prints what it measured (build times, image size, memory) and writes it as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: a SIGTERM must end the container within this many seconds (measured: about 1 s)
STOP_SECONDS = 10
BASE_IMAGE = "localhost/python:3.11-slim"  # the name the generated Dockerfile's FROM resolves to
SHARED = Path(os.environ.get("HEADSTART_SHARED", ROOT.parent / "shared"))
#: real photos: the shared ones (a cat, a bird, ...) and the three full-size camera JPEGs
PHOTOS = sorted((SHARED / "photos").glob("*.*")) + sorted((SHARED / "photos" / "camera").glob("*.jpg"))
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


class CheckFailed(RuntimeError):
    pass


def run(cmd: list[str], env: dict, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    if done.returncode != 0:
        raise CheckFailed(f"{' '.join(cmd[:4])} ... failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return done


def missing_tools() -> list[str]:
    return [tool for tool in ("podman", "runc", "mmdebstrap") if shutil.which(tool) is None]


def podman_env(work: Path) -> dict:
    (work / "containers.conf").write_text(CONTAINERS_CONF)
    (work / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\nrunroot = "{work}/run"\ngraphroot = "{work}/graph"\n'
    )
    return {
        **os.environ,
        "CONTAINERS_CONF": str(work / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(work / "storage.conf"),
    }


def make_base(work: Path, env: dict) -> float:
    """The local ``python:3.11-slim``; returns the seconds it took."""
    started = time.perf_counter()
    (work / "uv.toml").write_text("native-tls = true\n")  # uv verifies with the system trust store
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        raise CheckFailed("uv is not installed (pip install uv: the dev extra has it)")
    release = next(
        line.split("=", 1)[1].strip()
        for line in Path("/etc/os-release").read_text().splitlines()
        if line.startswith("VERSION_CODENAME=")
    )
    run(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--include=python3",
            "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
            *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("man", "locale", "doc")),
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            '--customize-hook=mkdir -p "$1/etc/ssl/certs" "$1/etc/uv"',
            "--customize-hook=upload /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt",
            f"--customize-hook=copy-in {uv} /usr/local/bin",
            f"--customize-hook=upload {work / 'uv.toml'} /etc/uv/uv.toml",
            '--customize-hook=chroot "$1" ln -sf /usr/bin/python3 /usr/local/bin/python',
            '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*',
            release,
            str(work / "base.tar"),
        ],
        env,
    )
    run(["podman", "import", str(work / "base.tar"), BASE_IMAGE], env)
    (work / "base.tar").unlink()
    return time.perf_counter() - started


def build_image(model: str, work: Path, env: dict, image: str) -> tuple[str, float]:
    """The CPU bento of ``model`` and its image; returns (the bento's tag, seconds to build the image)."""
    bentoml = [sys.executable, "-m", "bentoml"]
    tag = run([*bentoml, "build", "-o", "tag"], {**env, "HEADSTART_MODEL": model}, cwd=ROOT).stdout.strip().split()[-1]
    tag = tag.removeprefix("__tag__:")
    context = work / "context"
    context.mkdir()
    started = time.perf_counter()
    run(
        [*bentoml, "containerize", tag, "--backend", "podman", "-t", image, "--opt", "network=host"],
        {**env, "TMPDIR": str(context)},
        cwd=context,
    )
    return tag, time.perf_counter() - started


def wait_ready(url: str, timeout: float = 120) -> float:
    import httpx

    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise CheckFailed(f"{url}/readyz not ready after {timeout} s")


def answers(url: str) -> dict:
    """/classify and /localize of every shared photo, and /info."""
    import httpx

    out = {"info": httpx.post(f"{url}/info", timeout=30).json()}
    for photo in PHOTOS:
        for route in ("classify", "localize"):
            resp = httpx.post(f"{url}/{route}", files={"image": (photo.name, photo.read_bytes())}, timeout=60)
            if resp.status_code != 200:
                raise CheckFailed(f"{route} of {photo.name}: {resp.status_code} {resp.text[:300]}")
            out[f"{route} {photo.name}"] = resp.json()
    return out


def same_answers(container: dict, checkout: dict) -> list[str]:
    """Where the container answers otherwise than the checkout's server: labels, "none of these" and boxes the same,
    scores within 1e-4 (the same runtime and precision; the container may hold a newer wheel of it)."""
    differences = []
    for key, want in checkout.items():
        got = container[key]
        if key == "info":
            for field in ("name", "version", "runtime", "device", "precision", "labels"):
                if got[field] != want[field]:
                    differences.append(f"/info {field}: {got[field]!r} != {want[field]!r}")
            continue
        if [p["label"] for p in got["predictions"]] != [p["label"] for p in want["predictions"]]:
            differences.append(f"{key}: labels {got['predictions']} != {want['predictions']}")
        elif (
            max(abs(a["score"] - b["score"]) for a, b in zip(got["predictions"], want["predictions"], strict=True))
            > 1e-4
        ):
            differences.append(f"{key}: scores {got['predictions']} != {want['predictions']}")
        if got["unknown"] != want["unknown"]:
            differences.append(f"{key}: unknown {got['unknown']} != {want['unknown']}")
        if "detections" in want:
            boxes = [[d["label"], *d["box"].values()] for d in got["detections"]]
            expected = [[d["label"], *d["box"].values()] for d in want["detections"]]
            if len(boxes) != len(expected) or any(
                a[0] != b[0] or max(abs(x - y) for x, y in zip(a[1:], b[1:], strict=True)) > 1.0
                for a, b in zip(boxes, expected, strict=False)
            ):
                differences.append(f"{key}: boxes {boxes} != {expected}")
    return differences


def check(model: str, work: Path, keep: bool) -> dict:
    from headstart.service.devserver import free_port, serving

    env = podman_env(work)
    image, name, port = "localhost/headstart:check", f"headstart-check-{os.getpid()}", free_port()
    report: dict = {"base_seconds": round(make_base(work, env), 1)}
    try:
        tag, seconds = build_image(model, work, env, image)
        size = json.loads(run(["podman", "image", "inspect", image], env).stdout)[0]["Size"]
        report |= {"bento": tag, "build_seconds": round(seconds, 1), "image_mb": round(size / 1e6)}
        run(["podman", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:3000", image], env)
        try:
            report["ready_seconds"] = round(wait_ready(f"http://127.0.0.1:{port}"), 1)
            container = answers(f"http://127.0.0.1:{port}")
            stats = run(["podman", "stats", "--no-stream", "--format", "json", name], env).stdout
            report["memory"] = json.loads(stats)[0].get("mem_usage")
            report["uid"] = int(run(["podman", "exec", name, "id", "-u"], env).stdout)
            probe = "import importlib.util as u; print(u.find_spec('torch') is not None)"
            report["torch_installed"] = (
                run(["podman", "exec", name, "python", "-c", probe], env).stdout.strip() == "True"
            )
            # the font the labels are drawn in (service/fonts.py) ships in the bento: an accented label is not boxes
            probe = (  # the bento's code is in $BENTO_PATH/src, the image's working folder is $BENTO_PATH
                "import sys; sys.path.insert(0, 'src'); import service.fonts as f; "
                "print(f.DEJAVU.is_file() and f.font_for('é') == str(f.DEJAVU))"
            )
            report["label_font"] = run(["podman", "exec", name, "python", "-c", probe], env).stdout.strip() == "True"
            started = time.perf_counter()
            run(["podman", "stop", "-t", "30", name], env)
            report["stop_seconds"] = round(time.perf_counter() - started, 2)
            state = json.loads(run(["podman", "inspect", name], env).stdout)[0]["State"]
            report["exit_code"] = state["ExitCode"]
        finally:
            subprocess.run(["podman", "rm", "-f", name], env=env, capture_output=True)
        with serving(model, work / "checkout.log") as (url, _, _):
            checkout = answers(url)
        report["info"] = {k: container["info"][k] for k in ("name", "version", "runtime", "device", "precision")}
        report["differences"] = same_answers(container, checkout)
        report["photos"] = len(PHOTOS)
    finally:
        for img in ([] if keep else [image]) + [BASE_IMAGE]:
            subprocess.run(["podman", "rmi", "-f", img], env=env, capture_output=True)
        if not keep:
            subprocess.run(["podman", "system", "reset", "-f"], env=env, capture_output=True)
    problems = list(report["differences"])
    if report["uid"] == 0:
        problems.append("the service runs as root inside the container")
    if report["torch_installed"]:
        problems.append("torch is installed in the image")
    if not report["label_font"]:
        problems.append("the labels' font (service/fonts/DejaVuSans.ttf) is not in the image")
    if report["exit_code"] != 0 or report["stop_seconds"] > STOP_SECONDS:
        problems.append(
            f"SIGTERM: exit {report['exit_code']} after {report['stop_seconds']} s (at most {STOP_SECONDS})"
        )
    report["problems"] = problems
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a headstart model tag in the BentoML store (BENTOML_HOME)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--keep", action="store_true", help="keep the image (and the storage) afterwards")
    parser.add_argument("--workdir", help="podman's private folder (default: a temporary one, removed)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the container check runs rootful podman: run it as root (sudo)", file=sys.stderr)
        return 2
    if missing := missing_tools():
        print(f"missing {', '.join(missing)}: apt-get install podman runc mmdebstrap", file=sys.stderr)
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="headstart-container-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = check(args.model, work, args.keep)
    except CheckFailed as exc:
        print(f"container check failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
