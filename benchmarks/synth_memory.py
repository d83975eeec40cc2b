"""Generation speed and peak memory of synth.synth_slide for large slides.

    python benchmarks/synth_memory.py 20000x15000 [40000x30000 ...]

Each size runs in a fresh subprocess; prints Mpx/s (level 0) and peak RSS (ru_maxrss) against
the size of level 0 held as one RGB array (which the writer never does).
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(w: int, h: int, out: Path) -> None:
    code = textwrap.dedent(f"""
        import resource, time
        from wsi_response import synth
        t = time.perf_counter()
        synth.synth_slide({str(out / 'big.svs')!r}, size_px=({w}, {h}), seed=1)
        dt = time.perf_counter() - t
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, dt)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    rss_mb, seconds = map(float, res.stdout.split()[-2:])
    size_mb = (out / "big.svs").stat().st_size / 1e6
    print(f"{w}x{h}: {seconds:.1f} s, {w * h / 1e6 / seconds:.2f} Mpx/s (level 0), "
          f"peak RSS {rss_mb:.0f} MB vs level-0 array {w * h * 3 / 1e6:.0f} MB, "
          f"file {size_mb:.0f} MB", flush=True)


if __name__ == "__main__":
    sizes = sys.argv[1:] or ["20000x15000"]
    for s in sizes:
        w, h = (int(v) for v in s.lower().split("x"))
        with tempfile.TemporaryDirectory() as d:
            run(w, h, Path(d))
