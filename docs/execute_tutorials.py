"""Run the tutorials at full size and store their outputs in the notebooks, for the docs.

``python3 docs/execute_tutorials.py [NOTEBOOK ...]`` (default: every ``tutorials/NN_*.ipynb``)
executes each notebook in place, one at a time, without the ``CI`` smoke switch, with the
inline matplotlib backend (``MPLBACKEND`` unset: ``Agg`` would drop the figures), then
re-encodes every PNG output as a 256-colour palette PNG (plots have few colours: about 3x
smaller, no visible loss) and drops the per-cell execution timestamps, so a re-run changes the
file only where a number or a picture changed. The notebook's metadata records the run
(``{"pyro_emvae": {"smoke": false, "seconds": ...}}``), which the tests check. The site renders these stored outputs; it never
executes a notebook (``nb_execution_mode = "off"`` in ``docs/conf.py``).
"""

from __future__ import annotations

import base64
import io
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compress_png(data: str) -> str:
    from PIL import Image

    raw = base64.b64decode(data)
    img = Image.open(io.BytesIO(raw))
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        img = img.quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    else:
        img = img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=True)
    small = out.getvalue()
    return base64.b64encode(small if len(small) < len(raw) else raw).decode("ascii")


def tidy(nb) -> None:
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        for out in cell.get("outputs", []):
            png = out.get("data", {}).get("image/png")
            if png:
                out["data"]["image/png"] = compress_png(png)


def execute(path: Path) -> float:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(
        nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    elapsed = time.perf_counter() - start
    tidy(nb)
    # what tests/test_tutorials.py reads: these outputs are a full-size run's
    nb.metadata["pyro_emvae"] = {"smoke": False, "seconds": round(elapsed)}
    nbformat.write(nb, path)
    return elapsed


def main(argv: list[str]) -> None:
    os.environ.pop("CI", None)  # full size
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend captures the figures
    paths = [Path(a) for a in argv] or sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.ipynb"))
    for path in paths:
        elapsed = execute(path.resolve())
        print(f"{path.name}: {elapsed:.0f} s, {path.stat().st_size / 1024:.0f} KB", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
