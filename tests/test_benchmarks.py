"""Every benchmark script runs (`--smoke`) and prints its table; accelerator.py also with only the GPU machine's packages.

No benchmark can rot unnoticed: each script in benchmarks/ has a `--smoke` mode (tiny sizes,
one repeat, the torchvision side included where the script has one) that runs here in a
subprocess, and the table it prints is read back (`_timing.table_rows`).

The GPU machine the benchmark runs on has only jax, flax, optax, orbax-checkpoint and
numpy, so the smoke run happens in a subprocess where the other packages cannot be
found (every `sys.meta_path` finder wrapped). absl is hidden only from this
repository's code: optax and flax import it themselves (absl-py is one of their own
dependencies, so it is installed wherever they are).

The smoke subprocess uses the suite's persistent compilation cache: warm, it takes
about a minute on 2 busy cores; cold (first run, or after a model change) a few minutes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "accelerator.py"

FORBIDDEN = (
    "grain", "ml_collections", "pycocotools", "tensorflow_datasets", "tensorflow", "tqdm", "torch", "torchvision",
    "matplotlib", "PIL", "tensorboardX", "absl",
)  # fmt: skip

# Runs the script (argv after "--") with the FORBIDDEN packages absent, as on the GPU
# machine: every meta-path finder is wrapped so that they are not found (`import x` raises
# ModuleNotFoundError, `importlib.util.find_spec(x)` is None, so optional probes such as
# etils' tensorflow check behave as there). Each attempt is recorded with its import chain.
_BLOCKED_RUN = r"""
import os, runpy, sys
FORBIDDEN = set(sys.argv[1].split(","))
REPO = os.path.realpath(sys.argv[2]) + os.sep
attempts = []  # (ours, chain)

def _machinery(filename):
    return filename.startswith("<frozen") or os.sep + "importlib" + os.sep in filename

def _ours(filename):
    path = os.path.realpath(filename)
    return path.startswith(REPO) and "site-packages" not in path and "dist-packages" not in path

def import_chain():
    chain, importer, f = [], None, sys._getframe(2)
    while f is not None:
        filename = f.f_code.co_filename
        if not _machinery(filename) and filename != "<string>":
            if importer is None:
                importer = filename
            if f.f_code.co_name == "<module>" or not chain:
                name = f.f_globals.get("__name__", "?")
                name = os.path.relpath(filename, REPO) if name == "__main__" else name
                chain.append(name if f.f_code.co_name == "<module>" else f"{name}.{f.f_code.co_name}()")
        f = f.f_back
    return _ours(importer or ""), " -> ".join(reversed(chain))

class Hidden:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in FORBIDDEN:
            ours, chain = import_chain()
            if ours or top != "absl":  # absl: optax's own dependency, installed with it
                attempts.append((ours, f"{chain} -> {name}"))
                return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find is not None else None
    def __getattr__(self, attr):
        return getattr(self.finder, attr)

sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]
script = sys.argv[4]
sys.argv = sys.argv[4:]
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
print("FORBIDDEN-IMPORT-CHECK ours:", sorted({c for o, c in attempts if o}))
print("FORBIDDEN-IMPORT-CHECK third-party (optional, handled):", sorted({c for o, c in attempts if not o}))
sys.exit(code)
"""


def _subprocess_env(devices: int) -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    # Cheaper CPU code generation: compiling, not running, dominates the smoke run (~2x faster cold).
    fast = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"] + fast)
    # The suite's persistent compilation cache (tests/conftest.py): a warm run compiles nothing.
    if jax.config.jax_compilation_cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def accelerator_python() -> str:
    """The interpreter of the accelerator smoke: FRCNN_ACCELERATOR_PYTHON (`make test` points it at a venv
    of the GPU machine's package set, .ci/gpu-machine-requirements.txt: jax 0.11.2, flax, optax,
    orbax-checkpoint, numpy), else this one."""
    return os.environ.get("FRCNN_ACCELERATOR_PYTHON") or sys.executable


def test_accelerator_smoke_runs_with_only_the_gpu_machines_packages(tmp_path):
    """--smoke on CPU (2 devices: the data-parallel path), all rows present with positive throughput.

    Two checks in one run (compiling the programs twice would double the test's time):
    (1) the benchmark works and reports, (2) it imports nothing the GPU machine lacks (absent
    there, and hidden here in case the interpreter has them).
    """
    python = accelerator_python()
    probe = subprocess.run([python, "-c", "import jax; print(jax.__version__)"], capture_output=True, text=True)
    assert probe.returncode == 0, f"{python} cannot import jax:\n{probe.stderr[-2000:]}"
    # bfloat16 only (the accelerator dtype; float32 runs everywhere else in the suite): 6 programs to compile.
    cmd = [python, "-c", _BLOCKED_RUN, ",".join(FORBIDDEN), str(REPO), "--", str(SCRIPT), "--smoke",
           "--dtypes", "bfloat16", "--out", str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=_subprocess_env(2), cwd=tmp_path, timeout=900)
    ours = [line for line in out.stdout.splitlines() if line.startswith("FORBIDDEN-IMPORT-CHECK ours:")]
    # (2) the import constraint. A failure here names the import chain, e.g.
    # "benchmarks/accelerator.py -> frcnn_jax.training.metrics -> tqdm".
    assert ours, (
        f"the import-blocking harness did not report\nstdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-6000:]}"
    )
    assert ours[0].endswith("[]"), (
        f"IMPORT CONSTRAINT VIOLATED (forbidden on the GPU machine): {ours[0]}\n{out.stderr[-4000:]}"
    )
    # (1) the benchmark itself.
    assert out.returncode == 0, f"rc={out.returncode}\nstdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-6000:]}"

    md, js = tmp_path / "accelerator-cpu-smoke.md", tmp_path / "accelerator-cpu-smoke.json"
    assert md.is_file() and js.is_file()
    doc = json.loads(js.read_text())
    assert doc["final"] and doc["smoke"] and doc["backend"] == "cpu" and doc["devices"] == 2
    assert f"jax {probe.stdout.strip()}," in doc["machine"]  # ran on the interpreter asked for
    print(f"accelerator smoke ran on {python}: {doc['machine']}")
    rows = {(r["arch"], r["dtype"], r["mode"]): r for r in doc["rows"]}
    expected = {(a, "bfloat16", m) for a in ("fpn", "c4", "maskfpn") for m in ("train", "infer")}
    assert set(rows) == expected
    for key, r in rows.items():
        assert r["status"] == "ok", (key, r)
        assert r["img_s"] > 0 and r["img_s_per_device"] > 0 and r["compile_s"] > 0, (key, r)
        assert r["peak_gb"] is None  # CPU: no device memory statistics
    assert all(rows[(a, d, "train")]["devices"] == 2 and rows[(a, d, "train")]["batch_per_device"] == 2
               for a in ("fpn", "c4", "maskfpn") for d in ("bfloat16",))  # fmt: skip

    # The printed table: a row per (model, dtype, mode) with a positive img/s.
    lines = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]
    col = {name: header.index(name) for name in ("model", "dtype", "mode", "img/s", "peak GB")}
    printed = {(c[col["model"]], c[col["dtype"]], c[col["mode"]]): c for c in cells}
    names = {"fpn": "R-18-FPN w8", "c4": "R-18-C4 w8", "maskfpn": "R-18-FPN w8 Mask R-CNN"}
    assert set(printed) == {(names[a], d, m) for a, d, m in expected}
    for c in printed.values():
        assert float(c[col["img/s"]]) > 0 and c[col["peak GB"]] == "n/a"
    assert "process peak RSS" in out.stdout and "process peak RSS" in md.read_text()
    assert md.read_text().count("| R-18-") == 6


# --- every other benchmark script: --smoke prints its table --------------------------------------
# script -> (extra arguments, first column of each expected row, columns that hold positive numbers)
SMOKE_RUNS = {
    "ops.py": ([], ["nms iou 0.7", "roi_align fwd sr=0", "roi_align fwd+bwd sr=0", "roi_align fwd sr=2",
                    "roi_align fwd+bwd sr=2", "encode_boxes", "decode_boxes"], ["JAX ms", "torchvision ms"]),
    "inference.py": ([], ["R-50-C4", "R-50-FPN", "Mask R-CNN R-50-FPN"], ["torchvision s/img", "JAX s/img"]),
    "train_step.py": ([], ["R-18-FPN 64x96", "R-18-FPN 64x96 Mask R-CNN"], ["torchvision s/step", "JAX s/step"]),
    "train_loop.py": ([], ["default"], ["loop img/s", "bare step img/s"]),
    "mask_target_fidelity.py": ([], ["112"], ["ROIs"]),
    "input_pipeline.py": ([], ["train pipeline, coco128 800/1333, batch 2", "train pipeline, shapes 128x128, batch 8",
                               "default config train step (model only), batch 8",
                               "evaluation (default model, shapes val, 8 images)"], []),
}  # fmt: skip


def test_every_benchmark_script_has_a_smoke_run_here():
    scripts = {p.name for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_")}
    own_tests = {"accelerator.py", "mask_paste.py"}  # smoke-tested by their own tests in this file
    assert scripts - own_tests <= set(SMOKE_RUNS), sorted(scripts - own_tests - set(SMOKE_RUNS))
    for name in scripts:
        assert "--smoke" in (REPO / "benchmarks" / name).read_text(), name


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE_RUNS))
def test_benchmark_smoke_prints_its_table(script, torch, shared, tmp_path):
    """`python benchmarks/<script> --smoke`: exit 0, the machine line, one table row per measured case."""
    args, first_cells, positive = SMOKE_RUNS[script]
    if script == "input_pipeline.py":
        args = [*args, "--shared", str(shared)]
    if script == "mask_target_fidelity.py":
        args = [*args, f"--annotations={shared / 'data' / 'coco128' / 'annotations_original_full.json'}"]
    cmd = [sys.executable, str(REPO / "benchmarks" / script), "--smoke", *args]
    env = _subprocess_env(1)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)
    assert out.returncode == 0, f"rc={out.returncode}\nstdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-6000:]}"
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from _timing import cpu_line, table_rows
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert cpu_line() in out.stdout  # the CPU (AVX-512 or not) beside the figures
    header, *rows = table_rows(out.stdout)
    assert [r[0] for r in rows] == first_cells, out.stdout[-3000:]
    for name in positive:
        col = header.index(name)
        assert all(float(r[col]) > 0 for r in rows), (name, rows)


# --- the batch search and the reporting, without compiling anything -----------------------------
@pytest.fixture(scope="module")
def accelerator():
    saved = list(sys.path)
    spec = importlib.util.spec_from_file_location("benchmarks_accelerator", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = saved
    return mod


def test_batch_search_falls_back_on_out_of_memory(accelerator, tmp_path):
    """Largest batch first; an XLA plan above the limit is not run; RESOURCE_EXHAUSTED moves to the next size."""
    acc = accelerator
    gib = acc.GIB
    calls = []

    class FakeCompiled:
        def __init__(self, job):
            self.job = job

        def memory_analysis(self):
            b = self.job.batch
            return types.SimpleNamespace(argument_size_in_bytes=b * gib, output_size_in_bytes=gib,
                                         alias_size_in_bytes=gib, temp_size_in_bytes=0)  # fmt: skip

    class Fake(acc.Benchmark):
        def setup(self, arch):
            return None

        def lower(self, job):
            if job.row.arch == "c4" and job.row.dtype == "float32" and job.row.mode == "infer":
                raise ValueError("a bug")  # reported as an error row; the others still run
            return job

        def compile(self, lowered):
            if lowered.row.mode == "train" and lowered.row.dtype == "float32" and lowered.batch == 8:
                raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1 bytes")
            return FakeCompiled(lowered)

        def execute(self, job):
            calls.append((job.row.arch, job.row.dtype, job.row.mode, job.batch))
            if job.row.mode == "train" and job.batch > 4:
                raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB")
            if job.row.arch == "c4" and job.row.mode == "train" and job.row.dtype == "float32":
                raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory")  # nothing fits
            devices = self.n_devices if job.row.mode == "train" else 1
            return {"seconds": 0.5, "images": job.batch * devices, "devices": devices}

    bench = Fake(acc.FULL, ["fpn", "c4"], ["bfloat16", "float32"], mem_limit_bytes=12 * gib)
    done = []
    bench.on_row_done = lambda row: done.append(row)
    bench.run()
    res = {(r.arch, r.dtype, r.mode, r.result["batch_per_device"]): r.result for r in bench.rows}
    n = bench.n_devices
    # 16: plan 16 GiB > 12 (never run); 8: OOM at run (bf16) or compile (f32); 4 fits.
    fpn_bf16 = res[("fpn", "bfloat16", "train", 4)]
    assert fpn_bf16["status"] == "ok" and fpn_bf16["img_s"] == pytest.approx(4 * n / 0.5)
    assert [t["batch_per_device"] for t in fpn_bf16["tried"]] == [16, 8]
    assert "plan 16.00 GB > limit 12.00 GB" in fpn_bf16["tried"][0]["outcome"]
    assert ("fpn", "bfloat16", "train", 16) not in calls and ("fpn", "bfloat16", "train", 8) in calls
    assert ("fpn", "float32", "train", 8) not in calls and res[("fpn", "float32", "train", 4)]["status"] == "ok"
    assert res[("c4", "float32", "train", 2)]["status"] == "oom"
    assert [t["batch_per_device"] for t in res[("c4", "float32", "train", 2)]["tried"]] == [16, 8, 4, 2]
    assert (
        res[("c4", "float32", "infer", 1)]["status"] == "error"
        and "a bug" in res[("c4", "float32", "infer", 1)]["error"]
    )
    assert res[("fpn", "float32", "infer", 8)]["status"] == "ok"
    assert res[("fpn", "bfloat16", "infer", 1)]["vs_d2_v100"] == pytest.approx(2.0 * 0.038)
    assert len(done) == len(bench.rows) == 12

    md, js = acc.write_outputs(bench, types.SimpleNamespace(smoke=False, out=str(tmp_path)), 1.0, final=True)
    text = pathlib.Path(md).read_text()
    assert "OOM at 16, 8" in text and "| OOM " in text and "| ERROR " in text
    assert len(json.loads(pathlib.Path(js).read_text())["rows"]) == 12
    assert acc.is_oom(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: foo")) and not acc.is_oom(ValueError("x"))

    # Past the time budget no fallback wave starts: rows still searching are reported as skipped.
    bench = Fake(acc.FULL, ["fpn"], ["bfloat16"], mem_limit_bytes=12 * gib, time_budget_s=1e-9)
    bench.run()
    res = {(r.mode, r.result["batch_per_device"]): r.result for r in bench.rows}
    assert res[("train", 8)]["status"] == "skipped" and [t["batch_per_device"] for t in res[("train", 8)]["tried"]] == [
        16
    ]
    assert res[("infer", 1)]["status"] == res[("infer", 8)]["status"] == "ok"
    assert any(row[5] == "SKIPPED" for row in bench.table_rows())


def test_mask_paste_smoke_prints_its_tables(torch, tmp_path):
    """benchmarks/mask_paste.py --smoke (ours and torchvision's paste, the RLE path) prints both tables."""
    script = REPO / "benchmarks" / "mask_paste.py"
    out = subprocess.run(
        [sys.executable, str(script), "--smoke"],
        capture_output=True, text=True, env=_subprocess_env(1), cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, f"rc={out.returncode}\nstdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}"
    lines = out.stdout.splitlines()
    assert any("AVX-512: " in line for line in lines) and any("torchvision 0." in line for line in lines)
    paste = [line.split("|")[1:-1] for line in lines if line.startswith("| 64x48") or line.startswith("| 300x200")]
    assert len(paste) == 4, out.stdout  # two rows in each table
    for cells in paste[:2]:  # image, masks, ours s, torchvision s, ratio, equal
        assert float(cells[2]) > 0 and float(cells[3]) > 0 and cells[5].strip() == "yes"
    for cells in paste[2:]:  # image, masks, RLE s, peak MiB, [K, H, W] MiB
        assert float(cells[2]) > 0 and float(cells[3]) >= 0
