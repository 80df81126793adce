"""Did BiSSL help? Compare fine-tuning runs of several backbones, seed by seed, with confidence intervals.

    python -m source.tools.compare BASELINE_RUN_DIR RUN_DIR [RUN_DIR ...] [--markdown F] [--csv F] [--figure F]

Each RUN_DIR is a ``fine-tuning.py`` run directory (``config.json`` + ``results.jsonl``); the
first one is the baseline (normally the plain pre-trained backbone). For seed runs
(``--use-hpo 0``) it prints, per run, the backbone and mean ± sample std of the test score
(top-1 %, or mAP % for voc2007) of the final and of the best-validation model, and per run
against the baseline the difference of means with a 95 % confidence interval and a two-sided
p-value:

* **paired by seed** when the two runs share at least two trial seeds (trial i of a run uses
  seed ``--seed + i``, so the same seed means the same head initialisation, batch order and
  augmentations): a paired t-test on the per-seed differences d_i = other_i − baseline_i,
  CI = mean(d) ± t_{0.975, n−1} · sd(d)/√n, plus the Wilcoxon signed-rank test and the sign test,
  which do not assume normal differences (worth reading when n is small, as 10 seeds are);
* otherwise **Welch's** unequal-variance t-test on the two samples.

The BiSSL paper (arXiv 2410.02387, Sec. 4) reports exactly this comparison: mean over 10 seeds
at each backbone's best HPO pair. Runs whose trial-defining settings differ (dataset, epochs,
batch size, data caps, ...) are refused with a message naming the settings; the backbone and
the fine-tuning (lr, wd) may differ, since each backbone is fine-tuned at its own best pair.
For HPO runs (``--use-hpo 1``) it reports the best (lr, wd) pair and the spread of the top-k
trials instead, since trials at different hyperparameters are not repeated measurements.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from source.data.detection import DETECTION_DATASETS
from source.run.checkpoint import save_figure_atomic
from source.run.errors import CommandLineParser, ConfigError, MissingInputError, add_debug_argument, run_entry_point
from source.stages.evaluation import METRIC_LABELS
from source.stages.hpo import RESULTS_FILENAME, ResultsFile

CONFIDENCE = 0.95
# Settings of fine-tuning.py that do not change what a trial computes (paths, devices, logging,
# how many trials), plus what a comparison varies: the backbone, the base seed (runs without
# shared seeds are compared unpaired) and the fine-tuning (lr, wd), since each backbone is
# fine-tuned at its own best pair. Every OTHER setting must agree between compared runs, so a
# flag added later is compared by default.
NOT_COMPARED = (
    "data_dir", "model_dir", "download_dataset", "device", "num_workers", "world_size", "dist_url", "omp_num_threads",
    "run_dir", "resume", "amp", "wandb_project", "wandb_mode", "log_every", "num_runs", "save_model",
    "prefetch_factor", "channels_last",  # loading and memory layout; fine-tuning.py lets them change on resume too
    "backbone_origin", "pretrained_backbone_filename", "seed", "lr", "wd",
)
HPO_SETTINGS = ("hpo_lr_min", "hpo_lr_max", "hpo_wd_min", "hpo_wd_max")  # compared between HPO runs only
_SCHEDULE_SETTINGS = ("epochs", "batch_size", "max_train_samples", "max_eval_samples", "pretrain_arch")
SUMMARY_SETTINGS = (*_SCHEDULE_SETTINGS, "pretrain_img_size")
# A detection run's images enter at the detector's sizes; the pre-training crop size plays no part.
DETECTION_SUMMARY_SETTINGS = (*_SCHEDULE_SETTINGS, "det_head", "det_min_size", "det_max_size")
# (label, results-row key) of the two fine-tuned models every trial scores on the test split.
MODELS = (("final", "test_final"), ("best-val", "test_best"))


@dataclass
class Run:
    """One fine-tuning run directory: its settings and its successful trials (one row per trial)."""

    path: Path
    label: str
    config: dict
    rows: list[dict]
    failed: int = 0

    @property
    def metric(self) -> str:
        return str(self.rows[0].get("metric", "top1")) if self.rows else "top1"

    @property
    def use_hpo(self) -> bool:
        return bool(self.config.get("use_hpo", 0))

    @property
    def backbone(self) -> str:
        return f"{self.config.get('backbone_origin', '?')}: {self.config.get('pretrained_backbone_filename', '?')}"

    def scores(self, key: str) -> dict[int, float]:
        """Per-seed score ``key`` (``test_final``, ``test_best``, ``best_val``) of the trials that have it."""
        return {int(row["seed"]): float(row[key]) for row in self.rows if row.get(key) is not None}


@dataclass
class Difference:
    """``other − baseline`` of one score: the mean difference, its CI and p-values.

    ``test`` is ``"paired"`` (per-seed differences, ``n`` pairs) or ``"welch"`` (``n`` = both
    sample sizes added). Values that cannot be computed (one pair, zero variance) are NaN.
    """

    test: str
    n: int
    mean: float
    ci_low: float = math.nan
    ci_high: float = math.nan
    p_value: float = math.nan
    p_wilcoxon: float = math.nan
    p_sign: float = math.nan
    seeds: list[int] = field(default_factory=list)


def load_run(path: Path | str, label: str | None = None) -> Run:
    """Read ``config.json`` and ``results.jsonl`` of a fine-tuning run directory.

    Failed (diverged) trials are counted and left out; if a trial has several rows the last one
    counts (as in ``fine-tuning.py``'s own summary).
    """
    path = Path(path)
    config_path, results_path = path / "config.json", path / RESULTS_FILENAME
    if not config_path.is_file() or not results_path.is_file():
        raise MissingInputError(f"{path} is not a fine-tuning run directory (needs config.json and {RESULTS_FILENAME})")
    by_trial = {int(row["trial"]): row for row in ResultsFile(results_path).rows()}
    ok = [by_trial[index] for index in sorted(by_trial) if by_trial[index].get("status", "ok") == "ok"]
    if not ok:
        raise ConfigError(f"{path}: no successful trials in {RESULTS_FILENAME}")
    return Run(path=path, label=label or path.name, config=json.loads(config_path.read_text()), rows=ok,
               failed=len(by_trial) - len(ok))


def _defaults() -> dict:
    """fine-tuning.py's defaults: the value of a setting that a run made before the flag existed lacks."""
    import config_default as cfg

    return {**dataclasses.asdict(cfg.GeneralConfig()), **dataclasses.asdict(cfg.FinetuneConfig()),
            **dataclasses.asdict(cfg.DetectionConfig())}


def _input_hashes(run: Run) -> dict[str, str]:
    """Content hashes of the run's input files (``inputs`` in config.json), the backbone's left out."""
    inputs = run.config.get("inputs") or {}
    return {label: digest for label, digest in inputs.items() if "pretrained-backbone" not in label}


def backbone_hash(run: Run) -> str | None:
    """sha256 of the fine-tuned backbone file, if the run recorded it."""
    inputs = run.config.get("inputs") or {}
    return next((digest for label, digest in inputs.items() if "pretrained-backbone" in label), None)


def setting_differences(runs: Sequence[Run]) -> list[str]:
    """One line per trial-defining setting on which some run differs from the first (baseline)."""
    baseline, defaults = runs[0], _defaults()
    # "debug" (--debug, a parser flag outside config_default) only changes how errors are shown.
    ignored = set(NOT_COMPARED) | {"inputs", "debug"} | (set() if baseline.use_hpo else set(HPO_SETTINGS))
    keys = sorted(set().union(*(run.config for run in runs)) - ignored)
    lines = []
    for key in keys:
        values = [run.config.get(key, defaults.get(key)) for run in runs]
        differing = [run for run, value in zip(runs[1:], values[1:]) if value != values[0]]
        if differing:
            shown = ", ".join(f"{run.config.get(key, defaults.get(key))!r} in {run.label}" for run in [baseline, *differing])
            lines.append(f"--{key.replace('_', '-')}: {shown}")
    # Other input files (e.g. split files) must be the same files; runs that predate the record are not checked.
    hashes = [_input_hashes(run) for run in runs]
    for label in sorted(set.intersection(*(set(h) for h in hashes))):
        differing = [run for run, h in zip(runs[1:], hashes[1:]) if h[label] != hashes[0][label]]
        if differing:
            lines.append(f"{label}: " + ", ".join(f"sha256 {h[label][:12]}... in {run.label}"
                                                   for run, h in zip(runs, hashes) if run is baseline or run in differing))
    return lines


def check_comparable(runs: Sequence[Run]) -> None:
    """Raise :class:`ConfigError` (a ``ValueError``) naming every trial-defining setting that differs
    between the runs."""
    if len(runs) < 1:
        raise ConfigError("give at least one run directory")
    differences = setting_differences(runs)
    if differences:
        raise ConfigError(
            "these runs were fine-tuned under different settings, so their scores are not comparable "
            "(only the backbone, the base --seed and --lr/--wd may differ):\n  " + "\n  ".join(differences)
        )


def _quiet(function, *args, **kwargs):
    """Call a scipy test, turning its warnings about degenerate data (zero variance, ties) into NaNs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            return function(*args, **kwargs)
        except ValueError:  # e.g. Wilcoxon with all differences zero
            return None


def paired_difference(baseline: dict[int, float], other: dict[int, float]) -> Difference:
    """Paired comparison over the seeds both runs have: d_i = other_i − baseline_i.

    t-test (``scipy.stats.ttest_rel``): t = mean(d) / (sd(d)/√n) with n − 1 degrees of freedom,
    CI = mean(d) ± t_{0.975, n−1}·sd(d)/√n. Wilcoxon signed-rank (zero differences dropped, exact
    distribution for small n) and the sign test (binomial, ties dropped) as checks that do not
    assume normally distributed differences.
    """
    seeds = sorted(set(baseline) & set(other))
    if not seeds:
        raise ValueError("the runs share no seed; use welch_difference")
    before = np.array([baseline[seed] for seed in seeds])
    after = np.array([other[seed] for seed in seeds])
    diffs = after - before
    result = Difference(test="paired", n=len(seeds), mean=float(diffs.mean()), seeds=seeds)
    if len(seeds) < 2:
        return result
    ttest = _quiet(stats.ttest_rel, after, before)
    if ttest is not None and np.isfinite(ttest.statistic):
        interval = ttest.confidence_interval(CONFIDENCE)
        result.ci_low, result.ci_high, result.p_value = float(interval.low), float(interval.high), float(ttest.pvalue)
    elif diffs.std() == 0:  # every seed moved by the same amount: the interval is that point
        result.ci_low = result.ci_high = result.mean
    wilcoxon = _quiet(stats.wilcoxon, diffs)
    if wilcoxon is not None:
        result.p_wilcoxon = float(wilcoxon.pvalue)
    nonzero = diffs[diffs != 0]
    # All ties: no evidence either way (scipy's Wilcoxon also answers 1 then).
    result.p_sign = float(stats.binomtest(int((nonzero > 0).sum()), int(nonzero.size), 0.5).pvalue) if nonzero.size else 1.0
    return result


def welch_difference(baseline: Sequence[float], other: Sequence[float]) -> Difference:
    """Unpaired comparison of the means by Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``).

    se = √(s_a²/n_a + s_b²/n_b), Welch–Satterthwaite degrees of freedom, CI = (mean_b − mean_a) ± t_{0.975, df}·se.
    """
    before, after = np.asarray(baseline, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if before.size == 0 or after.size == 0:
        raise ValueError("both runs need at least one score")
    result = Difference(test="welch", n=int(before.size + after.size), mean=float(after.mean() - before.mean()))
    if min(before.size, after.size) < 2:
        return result
    ttest = _quiet(stats.ttest_ind, after, before, equal_var=False)
    if ttest is not None and np.isfinite(ttest.statistic):
        interval = ttest.confidence_interval(CONFIDENCE)
        result.ci_low, result.ci_high, result.p_value = float(interval.low), float(interval.high), float(ttest.pvalue)
    return result


def compare_scores(baseline: dict[int, float], other: dict[int, float]) -> Difference:
    """Paired by seed when at least two seeds are shared, Welch otherwise."""
    if len(set(baseline) & set(other)) >= 2:
        return paired_difference(baseline, other)
    return welch_difference(list(baseline.values()), list(other.values()))


# ------------------------------------------------------------------------------------------------ reports
def _fmt(value: float, digits: int = 2, sign: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    value = round(value, digits) + 0.0  # no "-0.00"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _p(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def _lr_wd(run: Run) -> tuple[str, str]:
    lrs, wds = sorted({row["lr"] for row in run.rows}), sorted({row["wd"] for row in run.rows})
    return ", ".join(f"{v:g}" for v in lrs), ", ".join(f"{v:g}" for v in wds)


def seed_comparison(runs: Sequence[Run]) -> list[dict]:
    """One record per (run, model): mean ± std, and the difference to the baseline (``None`` for it)."""
    records = []
    for run in runs:
        for model, key in MODELS:
            scores = run.scores(key)
            mean, std = _mean_std(list(scores.values()))
            diff = None if run is runs[0] else compare_scores(runs[0].scores(key), scores)
            records.append({"run": run, "model": model, "n": len(scores), "mean": mean, "std": std, "difference": diff})
    return records


def hpo_summary(run: Run, top_k: int) -> dict:
    """Best trial by validation score, and mean ± std and range of the top-k validation scores."""
    ranked = sorted(run.rows, key=lambda row: row["best_val"], reverse=True)
    top = [row["best_val"] for row in ranked[:top_k]]
    mean, std = _mean_std(top)
    return {"run": run, "best": ranked[0], "n": len(ranked), "k": len(top), "top_mean": mean, "top_std": std,
            "top_min": min(top), "top_max": max(top)}


def settings_line(run: Run) -> str:
    summary = DETECTION_SUMMARY_SETTINGS if run.config.get("dset") in DETECTION_DATASETS else SUMMARY_SETTINGS
    keys = summary + (HPO_SETTINGS if run.use_hpo else ())
    return ", ".join(f"{key.replace('_', '-')} {run.config.get(key)}" for key in keys)


def markdown_report(runs: Sequence[Run], top_k: int = 5, extra_columns: dict[str, dict[str, str]] | None = None) -> str:
    """The comparison as Markdown tables. ``extra_columns``: column name -> {run label: cell} (e.g. wall time)."""
    check_comparable(runs)
    baseline = runs[0]
    metric = METRIC_LABELS.get(baseline.metric, baseline.metric)
    extra = extra_columns or {}
    lines = [f"Fine-tuning on **{baseline.config.get('dset')}**, test {metric}; baseline: **{baseline.label}**.",
             f"Shared settings: {settings_line(baseline)}.", ""]
    if baseline.use_hpo:
        header = ["run", "backbone", "trials", "best lr", "best wd", "best val", "test (final)", "test (best-val)",
                  f"top-{top_k} val mean ± std", f"top-{top_k} val range", *extra]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for run in runs:
            summary = hpo_summary(run, top_k)
            best = summary["best"]
            cells = [run.label, run.backbone, str(summary["n"]), f"{best['lr']:g}", f"{best['wd']:g}", _fmt(best["best_val"]),
                     _fmt(best["test_final"]), _fmt(best["test_best"]), f"{_fmt(summary['top_mean'])} ± {_fmt(summary['top_std'])}",
                     f"{_fmt(summary['top_min'])}–{_fmt(summary['top_max'])}", *(extra[name].get(run.label, "") for name in extra)]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "HPO trials at different (lr, wd) are not repeated measurements, so no test is made: fine-tune "
                  "each backbone over 10 seeds at its best pair (`--use-hpo 0 --lr .. --wd ..`) and compare those runs."]
        return "\n".join(lines)

    records = seed_comparison(runs)
    header = ["run", "backbone", "n", "lr", "wd", "test (final model)", "test (best-val model)", *extra]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        final, best = (next(r for r in records if r["run"] is run and r["model"] == model) for model, _ in MODELS)
        lr, wd = _lr_wd(run)
        name = f"{run.label} (baseline)" if run is baseline else run.label
        cells = [name, run.backbone, str(final["n"]), lr, wd, f"{final['mean']:.2f} ± {final['std']:.2f}",
                 f"{best['mean']:.2f} ± {best['std']:.2f}", *(extra[col].get(run.label, "") for col in extra)]
        lines.append("| " + " | ".join(cells) + " |")
    if len(runs) > 1:
        lines += ["", f"Difference to the baseline (run − {baseline.label}, points), {CONFIDENCE:.0%} confidence interval:", "",
                  "| run | model | test | n | difference | 95 % CI | p (t-test) | p (Wilcoxon) | p (sign) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for record in records:
            diff, run = record["difference"], record["run"]
            if diff is None:
                continue
            same_models = all(r.scores("test_final") == r.scores("test_best") for r in (baseline, run))
            if same_models and record["model"] != "final":
                continue  # the best-val model is the final one in both runs: one row says it all
            model = "final = best-val" if same_models else record["model"]
            test = "paired t" if diff.test == "paired" else "Welch t"
            ci = f"[{_fmt(diff.ci_low, sign=True)}, {_fmt(diff.ci_high, sign=True)}]"
            lines.append(f"| {run.label} | {model} | {test} | {diff.n} | {_fmt(diff.mean, sign=True)} | {ci} | "
                         f"{_p(diff.p_value)} | {_p(diff.p_wilcoxon)} | {_p(diff.p_sign)} |")
        lines += ["", "Paired: same trial seeds (head initialisation, batch order, augmentations), n = number of pairs; "
                  "Welch: unpaired, n = both runs' trials. A CI that contains 0 means no difference was shown at this n."]
    groups: dict[str, list[str]] = {}
    for run in runs:
        if backbone_hash(run):
            groups.setdefault(backbone_hash(run), []).append(run.label)
    for digest, labels in groups.items():
        if len(labels) > 1:
            lines += ["", f"Note: {', '.join(labels)} fine-tuned byte-identical backbone files (sha256 {digest[:12]}...)."]
    failed = [f"{run.label}: {run.failed}" for run in runs if run.failed]
    if failed:
        lines += ["", "Failed (diverged) trials left out: " + ", ".join(failed) + "."]
    return "\n".join(lines)


def csv_report(runs: Sequence[Run], top_k: int = 5) -> str:
    """The same numbers as machine-readable CSV: one row per (run, model), or per run for HPO."""
    check_comparable(runs)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    common = ["run", "label", "backbone_origin", "backbone", "dset", "metric"]

    def identity(run: Run) -> list:
        return [str(run.path), run.label, run.config.get("backbone_origin"), run.config.get("pretrained_backbone_filename"),
                run.config.get("dset"), run.metric]

    if runs[0].use_hpo:
        writer.writerow(common + ["trials", "best_lr", "best_wd", "best_val", "test_final", "test_best", "top_k",
                                  "top_k_val_mean", "top_k_val_std", "top_k_val_min", "top_k_val_max"])
        for run in runs:
            summary = hpo_summary(run, top_k)
            best = summary["best"]
            writer.writerow(identity(run) + [summary["n"], best["lr"], best["wd"], best["best_val"], best["test_final"],
                                             best["test_best"], summary["k"], summary["top_mean"], summary["top_std"],
                                             summary["top_min"], summary["top_max"]])
        return buffer.getvalue()
    writer.writerow(common + ["model", "n", "mean", "std", "lr", "wd", "test", "n_compared", "difference", "ci_low", "ci_high",
                              "p_value", "p_wilcoxon", "p_sign"])
    for record in seed_comparison(runs):
        run, diff = record["run"], record["difference"]
        lr, wd = _lr_wd(run)
        tail = ["", "", "", "", "", "", "", ""] if diff is None else [
            diff.test, diff.n, diff.mean, diff.ci_low, diff.ci_high, diff.p_value, diff.p_wilcoxon, diff.p_sign]
        writer.writerow(identity(run) + [record["model"], record["n"], record["mean"], record["std"], lr, wd, *tail])
    return buffer.getvalue()


def plot_comparison(runs: Sequence[Run], path: Path, model: str = "final") -> Path:
    """Seed runs: per-seed test scores, the same seed joined by a line across runs, and the
    difference to the baseline with its CI. HPO runs: validation score of the trials in rank order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    check_comparable(runs)
    key = dict(MODELS)[model]
    metric = METRIC_LABELS.get(runs[0].metric, runs[0].metric)
    figure = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(figure)
    if runs[0].use_hpo:
        axes = figure.add_subplot()
        for run in runs:
            ranked = sorted((row["best_val"] for row in run.rows), reverse=True)
            axes.plot(range(1, len(ranked) + 1), ranked, marker=".", label=run.label)
        axes.set_xlabel("HPO trial, ranked by best validation score")
        axes.set_ylabel(f"best validation {metric}")
        axes.legend()
    else:
        left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
        by_run = [run.scores(key) for run in runs]
        for seed in sorted(set().union(*by_run)):
            xs = [position for position, scores in enumerate(by_run) if seed in scores]
            left.plot(xs, [by_run[x][seed] for x in xs], color="0.6", lw=0.8, marker="o", ms=4, zorder=2)
        for position, scores in enumerate(by_run):
            if scores:
                left.hlines(np.mean(list(scores.values())), position - 0.25, position + 0.25, colors="k", lw=2, zorder=3)
        left.set_xticks(range(len(runs)), [run.label for run in runs], rotation=20, ha="right")
        left.set_ylabel(f"test {metric} ({model} model)")
        left.set_title("per seed (lines join the same seed; bar: mean)", fontsize="medium")
        others = runs[1:]
        for position, run in enumerate(others):
            diff = compare_scores(by_run[0], run.scores(key))
            low, high = diff.ci_low, diff.ci_high
            if math.isfinite(low):
                right.errorbar(position, diff.mean, yerr=[[diff.mean - low], [high - diff.mean]], fmt="o", capsize=5, color="C0")
            else:
                right.plot(position, diff.mean, "o", color="C0")
        right.axhline(0, color="k", lw=0.8)
        right.set_xticks(range(len(others)), [run.label for run in others], rotation=20, ha="right")
        right.set_xlim(-0.6, max(len(others), 1) - 0.4)
        right.set_ylabel(f"difference to {runs[0].label} (points)")
        right.set_title(f"mean difference, {CONFIDENCE:.0%} CI", fontsize="medium")
    figure.tight_layout()
    return save_figure_atomic(figure, path)


def _write(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def get_args_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="fine-tuning run directories; the first is the baseline")
    parser.add_argument("--labels", default="", help="comma-separated names of the runs (default: the folder names)")
    parser.add_argument("--markdown", type=Path, help="also write the Markdown table to this file")
    parser.add_argument("--csv", type=Path, help="write the numbers as CSV to this file")
    parser.add_argument("--figure", type=Path, help="write the figure (PNG/PDF/SVG by suffix) to this file")
    parser.add_argument("--figure-model", default="final", choices=[model for model, _ in MODELS],
                        help="which fine-tuned model's test score the figure shows (default: final)")
    parser.add_argument("--top-k", type=int, default=5, help="HPO runs: spread over the k best trials (default: 5)")
    add_debug_argument(parser)
    return parser


def main(args: argparse.Namespace) -> int:
    labels = [label.strip() for label in args.labels.split(",")] if args.labels else [None] * len(args.run_dirs)
    if len(labels) != len(args.run_dirs):
        raise ConfigError(f"--labels names {len(labels)} runs, but {len(args.run_dirs)} run directories were given")
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    runs = [load_run(path, label) for path, label in zip(args.run_dirs, labels)]
    if len({run.label for run in runs}) < len(runs):
        raise ConfigError("two runs have the same label; pass --labels")
    text = markdown_report(runs, args.top_k)
    print(text)
    if args.markdown:
        _write(text + "\n", args.markdown)
    if args.csv:
        _write(csv_report(runs, args.top_k), args.csv)
    if args.figure:
        print(f"figure: {plot_comparison(runs, args.figure, args.figure_model)}")
    return 0


if __name__ == "__main__":
    run_entry_point(main, get_args_parser())
