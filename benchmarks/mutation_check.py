"""`make mutate`: plant small, plausible bugs one at a time and check the tests catch each.

A test suite can pass for the wrong reason: an assertion that cannot fail, a parameter only
ever tested at a value where the bug is invisible (lambda = 1), a reference that shares the
bug. This tool keeps that honest. Each mutation below is one small bug of a kind that slips
through review (a formula, a sign, an axis, an off-by-one, a threshold, a default); the tool
copies the repository to a temporary directory, plants the bug there, runs only the tests
that cover it, and reports whether they failed (caught) or passed (survived). Every planted
bug must be caught; a survivor means a test is missing.

A mutation is (unique source snippet, replacement, covering tests). The file is found by
searching ``kacl_cli/`` for the snippet, so modules may move or split without touching this
list; a snippet that no longer occurs exactly once is reported as "stale" (update the list).
Covering tests are pytest node ids; when a file is gone (tests moved) or a node is not found,
the mutation's ``-k`` keyword expression over ``tests/`` is run instead.

Not part of ``make test``: it is a tool, run when tests or the code they cover change.

Usage:
    python -m benchmarks.mutation_check                # all; a table; exit 1 if any survives
    python -m benchmarks.mutation_check --only lambda  # those whose name contains "lambda"
    python -m benchmarks.mutation_check --list         # the list, without running anything
    python -m benchmarks.mutation_check --no-baseline  # skip the unmutated sanity run
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "kacl_cli"
KERNEL = "kacl_cli.stages.radiomics.backends.fast._texture"
IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache",
                                ".ruff_cache", "build", "dist", "*-workspace", "bench-results",
                                "phantoms")


@dataclass(frozen=True)
class Mutation:
    name: str
    kind: str          # formula | sign | axis | off-by-one | threshold | default
    snippet: str       # occurs exactly once in kacl_cli/
    replacement: str
    tests: tuple[str, ...]
    keyword: str       # -k fallback over tests/ when a node id is gone

    def describe(self) -> str:
        return f"{self.snippet.strip()}  ->  {self.replacement.strip()}"


EV = "tests/stages/evaluate/test_metrics.py::"
CO = "tests/models/test_contrastive.py::"
GC = "tests/stages/cam/test_gradcam.py::"
RS = "tests/stages/radiomics/test_stage.py::"

MUTATIONS: tuple[Mutation, ...] = (
    Mutation("lambda ignored (radiomics objective)", "formula",
             "self.spec.temperature, mask)\n        total = cls + self.spec.lam * con",
             "self.spec.temperature, mask)\n        total = cls + con",
             (f"{CO}test_gradient_flows_into_both_encoders",), "gradient_flows_into_both"),
    Mutation("lambda ignored (augment objective)", "formula",
             "self.spec.temperature)\n        total = cls + self.spec.lam * con",
             "self.spec.temperature)\n        total = cls + con",
             (f"{CO}test_augment_objective_two_views",), "augment_objective_two_views"),
    Mutation("NT-Xent temperature multiplies", "formula",
             "logits = a @ b.t() / temperature", "logits = a @ b.t() * temperature",
             (f"{CO}test_nt_xent_hand_computed",), "nt_xent_hand_computed"),
    Mutation("NT-Xent one direction only", "formula",
             "0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))",
             "F.cross_entropy(logits, target)",
             (f"{CO}test_nt_xent_hand_computed",
              f"{CO}test_nt_xent_permutation_equivariant_and_symmetric"), "nt_xent"),
    Mutation("positive mask inverted", "sign",
             "mask = distributed.gather_with_grad(mask.to(torch.uint8)).bool()",
             "mask = ~distributed.gather_with_grad(mask.to(torch.uint8)).bool()",
             (f"{CO}test_images_without_positive_get_classification_only",),
             "without_positive_get_classification_only"),
    Mutation("lambda default drifts from the CLI's", "default",
             "    lam: float = 0.1\n", "    lam: float = 0.5\n",
             ("tests/commands/test_contrast.py::test_cli_defaults_are_the_models_defaults",),
             "cli_defaults_are_the_models_defaults"),
    Mutation("epoch loss not weighted by batch size", "formula",
             "v = value.detach().float() * bs", "v = value.detach().float()",
             ("tests/training/test_fit.py::test_objective_parameters_are_trained_and_saved",),
             "objective_parameters_are_trained_and_saved"),
    Mutation("mean-AUC CI from the per-resample max", "formula",
             "per.mean(axis=1), np.nan)", "np.nanmax(per, axis=1), np.nan)",
             (f"{EV}test_bootstrap_cis_equal_a_naive_resampling_reference",),
             "naive_resampling_reference"),
    Mutation("one-class resamples kept in the mean (nanmean)", "threshold",
             "means = np.where(np.isfinite(per).all(axis=1), per.mean(axis=1), np.nan)",
             "means = np.nanmean(per, axis=1)",
             (f"{EV}test_bootstrap_cis_equal_a_naive_resampling_reference",),
             "naive_resampling_reference"),
    Mutation("CI tail not halved", "formula",
             "tail = (1.0 - level) / 2.0 * 100.0", "tail = (1.0 - level) * 100.0",
             (f"{EV}test_bootstrap_ci_contains_estimate_and_is_seeded",), "bootstrap_ci"),
    Mutation("bootstrap never draws the last image", "off-by-one",
             "idx = rng.integers(0, n, size=(c, n))", "idx = rng.integers(0, n - 1, size=(c, n))",
             (f"{EV}test_bootstrap_cis_equal_a_naive_resampling_reference",),
             "naive_resampling_reference"),
    Mutation("weighted AUC counts ties as wins", "formula",
             "num = (w_pos * (cn[:, self.lo] + cn[:, self.hi])).sum(axis=1) * 0.5",
             "num = (w_pos * cn[:, self.hi]).sum(axis=1) * 1.0",
             (f"{EV}test_weighted_auc_equals_sklearn_on_the_resample_it_stands_for",),
             "weighted_auc_equals_sklearn"),
    Mutation("overlap > T becomes >=", "threshold",
             "(o[None, :] > t[:, None] + TIE_EPS)", "(o[None, :] >= t[:, None] - TIE_EPS)",
             (f"{EV}test_threshold_rule_is_strict_and_missing_prediction_is_wrong",),
             "threshold_rule_is_strict"),
    Mutation("IoBB over the GT box's area", "formula",
             "    pa = area(pred_xywh)\n", "    pa = area(gt_xywh)\n",
             ("tests/test_boxes.py::test_iou_and_iobb_hand_computed",
              f"{EV}test_iou_and_iobb_hand_computed"), "iou_and_iobb_hand_computed"),
    Mutation("cam boxes scaled with swapped axes", "axis",
             "(orig_w[image] / map_w), (orig_h[image] / map_h))",
             "(orig_h[image] / map_h), (orig_w[image] / map_w))",
             ("tests/stages/evaluate/test_localization.py",), "lit_square or known_boxes"),
    Mutation("box height scaled by the x factor", "axis",
             "    b[..., 3] *= sy\n", "    b[..., 3] *= sx\n",
             ("tests/test_boxes.py::test_scale_and_pixel_slices",), "scale_and_pixel_slices"),
    Mutation("predict box w/h scales swapped", "axis",
             "return (x * sx, y * sy, w * sx, h * sy)", "return (x * sx, y * sy, w * sy, h * sx)",
             ("tests/commands/test_predict.py::test_map_box_to_original_scales_each_axis",),
             "map_box_to_original"),
    Mutation("map box one cell too narrow", "off-by-one",
             "float(cols.stop - cols.start)", "float(cols.stop - cols.start - 1)",
             (f"{GC}test_single_pixel_uses_pixel_edge_convention",
              f"{GC}test_threshold_is_a_fraction_of_the_peak"), "pixel_edge_convention"),
    Mutation("cam threshold >= becomes >", "threshold",
             "mask = (safe >= frac * peak[:, None, None])",
             "mask = (safe > frac * peak[:, None, None])",
             (f"{GC}test_threshold_is_a_fraction_of_the_peak",
              f"{GC}test_threshold_includes_values_equal_to_the_cut"), "threshold"),
    Mutation("GLCM/GLRLM angle validity: horizontal and vertical swapped", "axis",
             "return np.stack([w2, h2 & w2, h2, h2 & w2], axis=1)",
             "return np.stack([h2, h2 & w2, w2, h2 & w2], axis=1)",
             ("tests/stages/radiomics/test_fast_parity.py",), "pyradiomics"),
    Mutation("feature std with n - 1", "off-by-one",
             "var = np.divide((np.where(finite, x - mean, 0.0) ** 2).sum(axis=0), n,",
             "var = np.divide((np.where(finite, x - mean, 0.0) ** 2).sum(axis=0), n - 1,",
             (f"{RS}test_finite_stats_ignores_nan_and_constant_columns",), "finite_stats"),
    Mutation("z-score sign flipped", "sign",
             "z = (x - mean) / std", "z = (mean - x) / std",
             (f"{RS}test_zscore_stats_from_train_split_only",), "zscore"),
    Mutation("z-score statistics from the val split", "default",
             'TRAIN_SPLIT = "train"', 'TRAIN_SPLIT = "val"',
             (f"{RS}test_zscore_stats_from_train_split_only",), "zscore"),
)


def copy_repo(dest: Path) -> Path:
    """The repository (sources, tests, compiled kernel) under ``dest/repo``, with the real
    ``shared/`` beside it as the tests expect (a link, never copied)."""
    repo = dest / "repo"
    shutil.copytree(REPO, repo, ignore=IGNORE)
    shared = REPO.parent / "shared"
    if shared.is_dir():
        (dest / "shared").symlink_to(shared)
    kernel_dir = repo / Path(*KERNEL.split(".")[:-1])
    if not any(kernel_dir.glob("_texture*.so")):
        spec = importlib.util.find_spec(KERNEL)
        if spec is not None and spec.origin:
            shutil.copy2(spec.origin, kernel_dir)
        else:
            print("warning: no compiled radiomics kernel; the fast backend's numpy path runs",
                  file=sys.stderr)
    return repo


def locate(repo: Path, snippet: str) -> Path | None:
    """The one file under kacl_cli/ holding ``snippet`` exactly once (None if not exactly one
    occurrence in the package)."""
    hits = []
    for path in sorted((repo / PACKAGE).rglob("*")):
        if path.suffix in (".py", ".c") and path.is_file():
            hits += [path] * path.read_text().count(snippet)
    return hits[0] if len(hits) == 1 else None


def pytest_cmd(repo: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
            "--no-header", "-o", "addopts=--import-mode=importlib", *args]


def run_tests(repo: Path, m: Mutation, timeout: float) -> tuple[int, str, str]:
    """(pytest exit code, what ran, output tail). Node ids first; the -k fallback when a file
    is gone or pytest finds no such test (exit 4/5)."""
    env = {**os.environ, "PYTHONPATH": str(repo), "KACL_NO_PROGRESS": "1"}
    env.pop("KACL_REQUIRE_SAMPLE", None)
    attempts = []
    if all((repo / t.split("::")[0]).exists() for t in m.tests):
        attempts.append((list(m.tests), " ".join(m.tests)))
    attempts.append((["tests", "-k", m.keyword], f"-k '{m.keyword}'"))
    rc, out, what = 5, "", ""
    for args, what in attempts:
        try:
            proc = subprocess.run(pytest_cmd(repo, args), cwd=repo, env=env, text=True,
                                  capture_output=True, timeout=timeout)
            rc, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired:
            return -1, what, "timeout"
        if rc not in (4, 5):
            break
    return rc, what, "\n".join(out.strip().splitlines()[-3:])


def verdict(rc: int) -> str:
    return {0: "SURVIVED", 1: "caught", 2: "caught (collection error)", -1: "timeout",
            4: "no such tests", 5: "no tests ran"}.get(rc, f"error (exit {rc})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="run mutations whose name contains this")
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip running the covering tests unmutated first")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per pytest run")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.only.lower() in m.name.lower()]
    if args.list:
        for m in chosen:
            print(f"- {m.name} [{m.kind}]: {m.describe()}\n    tests: {', '.join(m.tests)}")
        return 0
    failed = False
    with tempfile.TemporaryDirectory(prefix="kacl-mutate-") as tmp:
        repo = copy_repo(Path(tmp))
        if not args.no_baseline:
            # A failure here would make every "caught" below meaningless.
            nodes = sorted({t for m in chosen for t in m.tests
                            if (repo / t.split("::")[0]).exists()})
            t0 = time.perf_counter()
            env = {**os.environ, "PYTHONPATH": str(repo), "KACL_NO_PROGRESS": "1"}
            proc = subprocess.run(pytest_cmd(repo, nodes), cwd=repo, env=env, text=True,
                                  capture_output=True)
            print(f"baseline (unmutated, {len(nodes)} test ids): exit {proc.returncode} "
                  f"in {time.perf_counter() - t0:.0f}s")
            if proc.returncode != 0:
                print(proc.stdout[-3000:] + proc.stderr[-2000:])
                return 2
        rows = []
        for m in chosen:
            path = locate(repo, m.snippet)
            if path is None:
                rows.append((m, "-", "-", "STALE (snippet not found exactly once)", 0.0))
                failed = True
                continue
            original = path.read_text()
            path.write_text(original.replace(m.snippet, m.replacement))
            t0 = time.perf_counter()
            try:
                rc, what, tail = run_tests(repo, m, args.timeout)
            finally:
                path.write_text(original)
            seconds = time.perf_counter() - t0
            v = verdict(rc)
            failed |= not v.startswith("caught")
            rows.append((m, str(path.relative_to(repo)), what, v, seconds))
            print(f"{v:>9}  {seconds:5.0f}s  {m.name}", flush=True)
            if not v.startswith("caught"):
                print(f"           {tail}")
    print("\n| mutation | kind | file | covering tests | result | s |")
    print("|---|---|---|---|---|---|")
    for m, path, what, v, seconds in rows:
        print(f"| {m.name} | {m.kind} | {path} | {what} | {v} | {seconds:.0f} |")
    n_caught = sum(r[3].startswith("caught") for r in rows)
    print(f"\n{n_caught} of {len(rows)} planted bugs caught")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
