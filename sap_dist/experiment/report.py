"""The experiment's report (`sap-dist experiment`, step 5): statistics over seeds, the sft curve
and each method's distance below it at equal task accuracy, the markdown table and the plots."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sap_dist.experiment.settings import ExperimentSettings

GROUP_SCORES = ("harmful_score_independent_by_risk_area", "harmful_score_by_form")
"""Per-group harmful scores a run row may hold (group -> percent), averaged over seeds per group."""
METRICS = ("harmful_score", "harmful_score_independent", "task_accuracy", "over_refusal", "refusal_rate",
           "harmful_score_keyword", "harmful_score_independent_keyword", "degenerate_share",
           "degenerate_share_independent", "train_time_s", "mean_step_time_s", "eval_time_s", "eval_time_independent_s")
HARMFUL = ("harmful_score", "harmful_score_independent")
"""The two harmful scores: bundled held-out prompts, and the independent set."""
COLORS = {"sft": "tab:red", "mix": "tab:orange", "sap_paper": "tab:blue", "sap_reference": "tab:green",
          "lisa": "tab:purple", "sap_fast": "tab:cyan",
          "sap_every_step": "tab:brown"}
"""Fixed colors of the methods most plots show, so figures of different experiments read alike."""
SPARE_COLORS = ("tab:olive", "tab:pink", "gold", "navy", "teal", "darkgreen", "maroon", "lime", "indigo", "sienna")
"""Colors for the other methods and variants, handed out in the order of their names."""
ORDER = ["sft", "mix", "lisa", "sap_every_step", "sap_paper", "sap_fast", "sap_reference", "anchor", "anchor_kl",
         "sap_anchor", "lisa_anchor"]
"""The order of the table's rows (a method not named comes last)."""


SETTING_ORDER = {"clean": 0, "poisoned": 1, "persistent": 2}
"""The table's order of settings: no attack, the standard attack, the persistent one."""


def _stats(values: list[float | None]) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": round(mean, 2), "sd": round(sd, 2), "min": min(vals), "max": max(vals), "n": len(vals),
            "values": vals}


def _mean_by_key(dicts: list[dict | None]) -> dict[str, float]:
    keys = sorted({k for d in dicts if d for k in d})
    return {k: round(sum(d[k] for d in dicts if d and k in d) / sum(1 for d in dicts if d and k in d), 2)
            for k in keys}


def aggregate(rows: list[dict], labels: dict[str, str] | None = None) -> dict[str, dict]:
    """Group run rows by setting/method: per metric mean/sd/min/max/n over seeds, the mean
    independent score per risk area, the model directories and the rows. `labels`: the table's
    name of each method (default METHOD_LABELS)."""
    from sap_dist.experiment.settings import METHOD_LABELS

    labels = labels or METHOD_LABELS
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(f"{row['setting']}/{row['method']}", []).append(row)
    out = {}
    for name, runs in groups.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        out[name] = {"setting": runs[0]["setting"], "method": runs[0]["method"],
                     "label": labels.get(runs[0]["method"], runs[0]["method"]),
                     **{m: _stats([r.get(m) for r in runs]) for m in METRICS},
                     **{key: _mean_by_key([r.get(key) for r in runs]) for key in GROUP_SCORES},
                     "model_dir": [r["model_dir"] for r in runs], "runs": runs}
    return out


# ------------------------------------------------------------------------------------------
# The sft curve: plain fine-tuning judged part way, the yardstick at equal task accuracy


def sft_curve(rows: list[dict], start: dict | None, setting: str) -> dict:
    """Points of plain fine-tuning (`sft` rows of `setting` that carry a `curve`, every learning
    rate) per seed, and their means over seeds per (learning rate, step); the start point (the
    aligned model, no fine-tuning) is step 0."""
    from sap_dist.experiment.runs import CURVE_METRICS

    points = []
    if start and start.get("task_accuracy") is not None:
        points.append({"seed": None, "learning_rate": None, "step": 0, **{k: start.get(k) for k in CURVE_METRICS}})
    for row in rows:
        if row["method"] == "sft" and row["setting"] == setting:
            points += [{"seed": row["seed"], "learning_rate": row["learning_rate"], **p} for p in row.get("curve", [])]
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault((p["learning_rate"] or 0.0, p["step"]), []).append(p)
    mean = [{"learning_rate": ps[0]["learning_rate"], "step": step, "n": len(ps),
             **{k: (_stats([p.get(k) for p in ps]) or {}).get("mean") for k in CURVE_METRICS}}
            for (_, step), ps in sorted(groups.items())]
    return {"setting": setting, "points": points, "mean": mean}


def interpolate(curve_mean: list[dict], accuracy: float, metric: str) -> float | None:
    """The curve's `metric` at task accuracy `accuracy`: piecewise linear through the mean points
    sorted by accuracy (every learning rate together); None outside the curve's accuracy range
    (no extrapolation)."""
    pts = sorted((p["task_accuracy"], p[metric]) for p in curve_mean
                 if p.get("task_accuracy") is not None and p.get(metric) is not None)
    if not pts or not pts[0][0] <= accuracy <= pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= accuracy <= x1:
            return round(y0 if x1 == x0 else y0 + (y1 - y0) * (accuracy - x0) / (x1 - x0), 2)
    return pts[0][1]  # a single point, at exactly this accuracy


def compare_with_curve(summary: dict[str, dict], curve: dict) -> None:
    """Add to each group of the curve's setting `sft_curve_at_accuracy` (the curve's harmful scores
    at the group's mean task accuracy) and `harmful_below_sft_curve` (group mean minus that:
    negative = safer than plain fine-tuning stopped at the same task accuracy)."""
    for g in summary.values():
        at, below = {}, {}
        if g["setting"] == curve["setting"] and g["task_accuracy"]:
            for metric in HARMFUL:
                at[metric] = interpolate(curve["mean"], g["task_accuracy"]["mean"], metric)
                below[metric] = (round(g[metric]["mean"] - at[metric], 2)
                                 if at[metric] is not None and g[metric] else None)
        g["sft_curve_at_accuracy"] = at or None
        g["harmful_below_sft_curve"] = below or None


# ------------------------------------------------------------------------------------------
# Table


def _fmt(stat: dict | None, digits: int = 1) -> str:
    if stat is None:
        return "–"
    if stat["n"] == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def _one(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.1f}"


def independent_label(s: ExperimentSettings) -> str:
    """How the independent set is named in the table and plots (the split says whether the
    numbers choose settings, `_val`, or report them, `_test`)."""
    return (s.independent_eval or "none").removeprefix("builtin:")


def judge_note(info: dict) -> str:
    """Which judge the harmful scores come from (its `describe()`), and its measured agreement
    with the project's labelled answers (docs/judging.md)."""
    test = (info.get("agreement") or {}).get("test")
    measured = (f": accuracy {test['accuracy']:.2f}, precision {test['precision']:.2f}, recall {test['recall']:.2f} "
                f"of \"harmful\" on {test['n']} labelled test answers" if test else "")
    return (f"Harmful scores: judge `{info['name']}`{measured} (docs/judging.md). Degenerate answers (empty, "
            "gibberish, unrelated) are neither harm nor protection. Keyword ASR: the literature's keyword judge, "
            "for comparison with papers.")


def _per_group_table(title: str, key: str, groups: list[dict], reference: dict[str, dict | None],
                     held_out: list[str] | None = None) -> str:
    """A table of one per-group score (`key`: group -> percent) for the start point and each
    method group; empty when no run has it. `held_out`: groups set apart after the others, with
    the mean over the groups seen and over those held out."""
    present = sorted({c for g in groups for c in g.get(key) or {}})
    if not present:
        return ""
    apart = [c for c in present if c in (held_out or [])]
    seen = [c for c in present if c not in apart]
    heads = seen + [f"{c} (held out)" for c in apart] + (["mean of seen", "mean of held out"] if apart else [])

    def cells(by: dict) -> list[str]:
        out = [_one(by.get(c)) for c in seen + apart]
        if apart:
            out += [_one(_mean([by[c] for c in part if by.get(c) is not None])) for part in (seen, apart)]
        return out

    rows = [("start point (aligned)", "–", (reference.get("aligned") or {}).get(key))]
    rows += [(f"`{g['method']}`", g["setting"], g.get(key)) for g in groups]
    return (f"\n{title}:\n\n| model | data | {' | '.join(heads)} |\n|---|---|{'---|' * len(heads)}\n"
            + "".join(f"| {name} | {data} | {' | '.join(cells(by))} |\n" for name, data, by in rows if by))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def markdown_table(summary: dict[str, dict], reference: dict[str, dict | None], s: ExperimentSettings,
                   curve: dict | None = None, judge_info: dict | None = None) -> str:
    """The table.md text; `judge_info`: the judge's `describe()` (None: only its name, `s.judge`)."""
    from sap_dist.experiment.settings import setting_label

    ind = independent_label(s)
    head = (f"| model | data | harmful ↓ (bundled) | harmful ↓ ({ind}) | task accuracy ↑ | over-refusal ↓ | "
            f"below sft curve (bundled / {ind}) | degenerate (bundled / {ind}) | keyword ASR (bundled / {ind}) | "
            "train time (s) | seeds |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for name, label in (("base", "base model (before alignment)"), ("aligned", "start point (aligned), no fine-tuning")):
        m = reference.get(name)
        if m:
            lines.append(f"| {label} | – | {_one(m['harmful_score'])} | {_one(m.get('harmful_score_independent'))} | "
                         f"{_one(m.get('task_accuracy'))} | {_one(m.get('over_refusal'))} | – | "
                         f"{_one(m.get('degenerate_share'))} / {_one(m.get('degenerate_share_independent'))} | "
                         f"{_one(m.get('harmful_score_keyword'))} / {_one(m.get('harmful_score_independent_keyword'))} | "
                         "– | – |")
    order = {m: i for i, m in enumerate(ORDER)}
    for key in sorted(summary, key=lambda k: (SETTING_ORDER.get(summary[k]["setting"], 9),
                                              order.get(summary[k]["method"], 9))):
        g = summary[key]
        data = setting_label(s, g["setting"])
        below = g.get("harmful_below_sft_curve") or {}
        lines.append(f"| {g['label']} (`{g['method']}`) | {data} | {_fmt(g['harmful_score'])} | "
                     f"{_fmt(g.get('harmful_score_independent'))} | {_fmt(g['task_accuracy'])} | "
                     f"{_fmt(g['over_refusal'])} | {_signed(below.get('harmful_score'))} / "
                     f"{_signed(below.get('harmful_score_independent'))} | "
                     f"{_fmt(g.get('degenerate_share'))} / {_fmt(g.get('degenerate_share_independent'))} | "
                     f"{_fmt(g.get('harmful_score_keyword'))} / {_fmt(g.get('harmful_score_independent_keyword'))} | "
                     f"{_fmt(g['train_time_s'], 0)} | "
                     f"{g['harmful_score']['n'] if g['harmful_score'] else 0} |")
    text = judge_note(judge_info or {"name": s.judge}) + "\n\n" + head + "\n".join(lines) + "\n"
    if curve and curve["mean"]:
        text += (f"\nPlain fine-tuning (`sft`, {curve['setting']} data) judged part way, mean over seeds "
                 f"(step 0: the start point):\n\n"
                 f"| learning rate | step | task accuracy ↑ | harmful ↓ (bundled) | harmful ↓ ({ind}) | seeds |\n"
                 "|---|---|---|---|---|---|\n")
        text += "".join(f"| {'–' if p['learning_rate'] is None else format(p['learning_rate'], 'g')} | "
                        f"{p['step']} | {_one(p['task_accuracy'])} | {_one(p['harmful_score'])} | "
                        f"{_one(p['harmful_score_independent'])} | {p['n']} |\n" for p in curve["mean"])
    ordered = [g for _, g in sorted(summary.items(), key=lambda kv: (SETTING_ORDER.get(kv[1]["setting"], 9),
                                                                      order.get(kv[1]["method"], 9)))]
    text += _per_group_table(f"Harmful score ↓ on {ind} per risk area (mean over seeds)",
                             "harmful_score_independent_by_risk_area", ordered, reference)
    held_out = (f" (held out of the fine-tuning's safety data: {', '.join(s.safety_held_out_forms)}; the means "
                "weigh each form the same)" if s.safety_held_out_forms else "")
    text += _per_group_table("Harmful score ↓ on the bundled prompts per request form (mean over seeds): does the "
                             f"protection hold on forms of request unlike its safety data?{held_out}",
                             "harmful_score_by_form", ordered, reference, s.safety_held_out_forms)
    return text


# ------------------------------------------------------------------------------------------
# Plots


def _moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def method_colors(methods) -> dict[str, str]:
    """A color per method or variant name: COLORS' own, then SPARE_COLORS in name order (cycled
    past their number), so that no two of up to len(SPARE_COLORS) other methods share one."""
    names = set(methods)
    others = sorted(names - set(COLORS))
    return {m: COLORS.get(m) or SPARE_COLORS[others.index(m) % len(SPARE_COLORS)] for m in names}


def _harmful_panel(ax, metric: str, title: str, summary: dict[str, dict], reference: dict, curve: dict | None,
                   s: ExperimentSettings, colors: dict[str, str]) -> None:
    from sap_dist.experiment.settings import setting_label

    if curve:  # plain fine-tuning part way: faint single seeds, the mean per learning rate as a line
        pts = [p for p in curve["points"] if p.get(metric) is not None and p.get("task_accuracy") is not None]
        ax.scatter([p["task_accuracy"] for p in pts], [p[metric] for p in pts], color=COLORS["sft"], marker="x",
                   s=14, alpha=0.35)
        start = [p for p in curve["mean"] if p["step"] == 0]
        for lr in sorted({p["learning_rate"] for p in curve["mean"] if p["learning_rate"] is not None}):
            line = start + [p for p in curve["mean"] if p["learning_rate"] == lr]
            line = [p for p in line if p.get(metric) is not None and p.get("task_accuracy") is not None]
            ax.plot([p["task_accuracy"] for p in line], [p[metric] for p in line], "--", color=COLORS["sft"],
                    alpha=0.5 if lr != s.learning_rate else 0.9, marker=".",
                    label=f"sft curve, lr {lr:g} (steps {', '.join(str(p['step']) for p in line)})")
    for g in summary.values():
        if not g.get(metric) or not g["task_accuracy"]:
            continue
        c = colors[g["method"]]
        marker = {"poisoned": "o", "persistent": "^"}.get(g["setting"], "s")
        runs = [r for r in g["runs"] if r.get(metric) is not None and r.get("task_accuracy") is not None]
        ax.scatter([r["task_accuracy"] for r in runs], [r[metric] for r in runs], color=c, alpha=0.3, marker=marker, s=18)
        data = setting_label(s, g["setting"], short=True)
        ax.errorbar(g["task_accuracy"]["mean"], g[metric]["mean"], xerr=g["task_accuracy"]["sd"], yerr=g[metric]["sd"],
                    color=c, marker=marker, markersize=8, capsize=3, label=f"{g['label']} ({data})", linestyle="none")
    for name, marker, label in (("aligned", "*", "aligned start point"), ("base", "X", "base model")):
        m = reference.get(name)
        if m and m.get("task_accuracy") is not None and m.get(metric) is not None:
            ax.scatter([m["task_accuracy"]], [m[metric]], color="black", marker=marker, s=120, label=label)
    ax.set_xlabel("task accuracy (%, exact match, held-out)")
    ax.set_ylabel(f"harmful score (%, {title})")
    ax.set_title(f"{title}: below the sft curve = safer at equal accuracy", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="best")


def make_plots(summary: dict[str, dict], reference: dict[str, dict | None], out_dir: str, s: ExperimentSettings,
               curve: dict | None = None) -> list[str]:
    from sap_dist.experiment.settings import setting_label

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sap_dist.metrics import read_metrics

    paths = []
    panels = [("harmful_score", "bundled held-out harmful prompts")]
    if s.independent_eval:
        panels.append(("harmful_score_independent", independent_label(s)))
    colors = method_colors(g["method"] for g in summary.values())  # one method, one color, in every plot
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 5.2), squeeze=False)
    for ax, (metric, title) in zip(axes[0], panels):
        _harmful_panel(ax, metric, title, summary, reference, curve, s, colors)
    fig.suptitle("Harmfulness vs utility (mean ± sd over seeds; faint: single seeds)", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "harmful_vs_accuracy.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

    # training curves: task loss (all methods) and SAP's safety loss, mean over seeds
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, g in sorted(summary.items()):
        curves_task, curves_safe = [], []
        for r in g["runs"]:
            try:
                rows = read_metrics(os.path.dirname(r["metrics"]))
            except (OSError, TypeError):
                continue
            curves_task.append([(row["step"], row["task_loss"]) for row in rows if isinstance(row.get("task_loss"), float)])
            curves_safe.append([(row["step"], row["safety_loss"]) for row in rows if isinstance(row.get("safety_loss"), float)])
        style = {"poisoned": "-", "persistent": "--"}.get(g["setting"], ":")
        data = setting_label(s, g["setting"], short=True)
        for ax, curves in ((axes[0], curves_task), (axes[1], curves_safe)):
            curves = [c for c in curves if c]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            steps = [c[0] for c in curves[0][:n]]
            mean = [sum(c[i][1] for c in curves) / len(curves) for i in range(n)]
            ax.plot(steps, _moving_average(mean, 5), style, color=colors[g["method"]],
                    label=f"{g['label']} ({data})")
    axes[0].set_title("task loss (response tokens), mean over seeds, moving average 5", fontsize=9)
    axes[1].set_title("SAP safety loss NLL(refusal) - NLL(compliance) on the safety batch", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "training_curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths
