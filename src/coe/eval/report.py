"""Write an evaluation's report: ``report.json``, ``report.md``, ``scores.json`` (the measured
table in the format ``coe router map --scores`` and ``router.scores`` read) and ``quality.png``
(quality vs average active parameters)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from coe.eval.pareto import Analysis
from coe.router.mapping import format_params

PLOT_NAME = "quality.png"


def report_dict(
    analysis: Analysis,
    params: Mapping[str, float],
    router_params: float,
    run: dict,
    suites: Mapping[str, int],
    skipped: Mapping[str, str],
    budget_params: float | None,
) -> dict:
    return {
        "run": run,
        "suites": dict(suites),
        "skipped": dict(skipped),
        "experts": {e: int(p) for e, p in params.items()},
        "router_params": int(router_params),
        "table": analysis.table,
        "points": [p.to_dict() for p in analysis.points],
        "frontier": [
            {
                "avg_active_params": round(m.avg_active_params),
                "expected_score": round(m.expected_score, 4),
                "map": m.assignment,
            }
            for m in analysis.frontier
        ],
        "budget_params": budget_params,
        "chosen_map": analysis.chosen.assignment,
        "map_scores": analysis.map_scores.to_dict(),
        "summary": summary(analysis.points, analysis.comparison),
        "notes": list(analysis.notes),
    }


def summary(points, comparison: Mapping | None = None) -> dict:
    """The claim in numbers: the chosen CoE map, cross-fitted where the analysis has it, against
    the single experts it beats or matches, and (``comparison``) its paired difference from the
    best single expert."""
    singles = [p for p in points if p.kind == "single"]
    chosen_points = [p for p in points if p.kind == "coe" and p.detail.get("chosen")]
    if not singles or not chosen_points:
        return {}
    chosen = max(chosen_points, key=lambda p: p.crossfit)  # the cross-fitted one when there is one
    honest = [p for p in points if p.kind == "coe" and p.crossfit == chosen.crossfit]
    best = max(singles, key=lambda p: p.score)
    return {
        "chosen_coe": chosen.name,
        "chosen_score": round(chosen.score, 4),
        "chosen_crossfit": chosen.crossfit,
        "best_single": best.name,
        "best_single_score": round(best.score, 4),
        "beaten_by_chosen": [p.name for p in singles if chosen.score > p.score],
        "matched_or_beaten_at_no_more_params": [
            s.name
            for s in singles
            if any(
                c.score >= s.score and c.avg_active_params <= s.avg_active_params for c in honest
            )
        ],
        **({"coe_minus_best_single": dict(comparison)} if comparison else {}),
    }


def write(folder: Path, report: dict) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "report.json", folder / "report.md", folder / "scores.json"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(report), encoding="utf-8")
    paths[2].write_text(json.dumps(report["map_scores"], indent=2) + "\n", encoding="utf-8")
    plot = plot_png(folder / PLOT_NAME, report)
    return paths + ([plot] if plot else [])


# -- markdown ---------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    experts = list(report["experts"])
    lines = ["# coe evaluation", "", _summary(report), ""]
    lines += [
        "## Score per category (mean ± 95% interval, n items)",
        "",
        "| category | " + " | ".join(experts) + " |",
        "|---|" + "---|" * len(experts),
    ]
    for cat, row in report["table"].items():
        cells = [f"{row[e]['score']:.3f} ±{row[e]['ci95']:.2f} (n={row[e]['n']})" for e in experts]
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    shown = _shown_points(report["points"])
    lines += [
        "",
        "## Quality vs average active parameters (same items for every row)",
        "",
        f"Every single expert and baseline, and {sum(p['kind'] == 'coe' for p in shown)} of the "
        f"{sum(p['kind'] == 'coe' for p in report['points'])} CoE frontier maps (all in report.json).",
        "",
        "| policy | kind | crossfit | score | ±95% | avg active params |",
        "|---|---|---|---|---|---|",
    ]
    for p in shown:
        mark = " **(chosen map)**" if p.get("detail", {}).get("chosen") else ""
        lines.append(
            f"| {p['name']}{mark} | {p['kind']} | {'yes' if p.get('crossfit') else 'no'} | "
            f"{p['score']:.3f} | {p['ci95']:.3f} | {format_params(p['avg_active_params'])} |"
        )
    lines += [
        "",
        "## Chosen category-to-expert map",
        "",
        f"Budget: {format_params(report['budget_params']) if report['budget_params'] else 'none'} "
        f"average active parameters.",
        "",
        "| category | expert |",
        "|---|---|",
    ]
    lines += [f"| {c} | {e} |" for c, e in report["chosen_map"].items()]
    lines += ["", f"Scores for the map: {report['map_scores']['source']}", ""]
    if report["skipped"]:
        lines += (
            ["## Skipped", ""] + [f"- {s}: {why}" for s, why in report["skipped"].items()] + [""]
        )
    lines += [
        "## Notes",
        "",
        "- Every policy is scored on the same items; a category's weight is uniform.",
        "- CoE rows marked crossfit are scored on items their maps were not fitted on (k-fold "
        "cross-fitting: each fold routed by the map fitted on the other folds). The others use maps "
        "fitted on these same items, so they are optimistic by construction; the single experts "
        "and the per-item oracle fit nothing.",
        f"- Routed policies include the router's {format_params(report['router_params'])} parameters.",
        *(f"- {note}" for note in report.get("notes", [])),
        f"- Run: {json.dumps(report['run'])}",
        "",
    ]
    return "\n".join(lines)


def _shown_points(points: list[dict], max_maps: int = 12) -> list[dict]:
    """Points by cost; the in-sample and the cross-fitted CoE maps each thinned to about
    ``max_maps`` evenly spaced, the chosen ones and the cross-fitted configured-budget ones
    kept."""
    kept: set[int] = set()
    for crossfit in (False, True):
        maps = [p for p in points if p["kind"] == "coe" and p.get("crossfit", False) == crossfit]
        step = max(1, -(-len(maps) // max_maps))
        kept |= {
            id(p)
            for k, p in enumerate(maps)
            if k % step == 0
            or k == len(maps) - 1
            or p.get("detail", {}).get("chosen")
            or (crossfit and "budget" not in p.get("detail", {}))
        }
    shown = [p for p in points if p["kind"] != "coe" or id(p) in kept]
    return sorted(shown, key=lambda p: (p["avg_active_params"], p["score"]))


def _summary(report: dict) -> str:
    claim = report["summary"]
    if not claim:
        return "No complete results."
    points = {p["name"]: p for p in report["points"]}
    chosen, best = points[claim["chosen_coe"]], points[claim["best_single"]]
    singles = [p for p in report["points"] if p["kind"] == "single"]
    beaten, matched = claim["beaten_by_chosen"], claim["matched_or_beaten_at_no_more_params"]
    verdict = (
        "beats every single expert"
        if len(beaten) == len(singles)
        else f"beats {len(beaten)} of {len(singles)} single experts"
    )
    fitted = "cross-fitted " if claim.get("chosen_crossfit") else ""
    text = (
        f"The learned router with the {fitted}chosen map scores **{chosen['score']:.3f}** at "
        f"{format_params(chosen['avg_active_params'])} average active parameters and {verdict}; "
        f"the best single expert, {best['name']}, scores {best['score']:.3f} at "
        f"{format_params(best['avg_active_params'])}. A {fitted}CoE map at no more active "
        f"parameters scores at least as well as {len(matched)} of {len(singles)} single experts"
        + (f" ({', '.join(matched)})." if matched else ".")
    )
    paired = claim.get("coe_minus_best_single")
    if paired:
        low, high = paired["paired_ci95"]
        text += (
            f" CoE minus {paired['best_single']}: {paired['difference']:+.3f} "
            f"(paired bootstrap 95% interval {low:+.3f} to {high:+.3f})"
            + (
                f", at {paired['params_share']:.0%} of its active parameters."
                if paired.get("params_share")
                else "."
            )
        )
    refined = next(
        (p for p in report["points"] if "minus_category_map" in p.get("detail", {})), None
    )
    if refined:
        against = refined["detail"]["minus_category_map"]
        low, high = against["paired_ci95"]
        text += (
            f" The per-cluster map minus the category map, both cross-fitted: "
            f"{against['difference']:+.3f} (paired 95% interval {low:+.3f} to {high:+.3f}) at "
            f"{format_params(refined['avg_active_params'])} against "
            f"{format_params(chosen['avg_active_params'])}; serving uses the category map."
        )
    return text


# -- plot -------------------------------------------------------------------------------------------
def plot_png(path: Path, report: dict) -> Path | None:
    """Quality vs average active parameters; None when matplotlib (extra `eval`) is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    points = report["points"]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    _draw(
        ax,
        [p for p in points if p["kind"] == "single"],
        "o",
        "tab:blue",
        "single expert",
        labels=True,
    )
    _draw(
        ax, [p for p in points if p["kind"] == "baseline"], "^", "tab:gray", "baseline", labels=True
    )
    for crossfit, style, color, label in (
        (False, "--s", "tab:pink", "coe, maps fitted on these items (optimistic)"),
        (True, "-s", "tab:red", "coe, cross-fitted maps"),
    ):
        coe = sorted(
            (
                p
                for p in points
                if p["kind"] == "coe"
                and p.get("crossfit", False) == crossfit
                and "expected-score" not in p["name"]
            ),
            key=lambda p: p["avg_active_params"],
        )
        if coe:
            ax.plot(
                [p["avg_active_params"] for p in coe],
                [p["score"] for p in coe],
                style,
                color=color,
                label=label,
            )
    chosen = [p for p in points if p["kind"] == "coe" and p.get("detail", {}).get("chosen")]
    _draw(ax, chosen, "*", "gold", "coe, chosen map", labels=False, size=220)
    ax.set_xscale("log")
    ax.set_xlabel("average active parameters (log scale)")
    ax.set_ylabel("score (category-weighted)")
    ax.set_title("coe: quality vs active parameters")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _draw(
    ax, points: Sequence[dict], marker: str, color: str, label: str, labels: bool, size: int = 50
) -> None:
    if not points:
        return
    ax.scatter(
        [p["avg_active_params"] for p in points],
        [p["score"] for p in points],
        marker=marker,
        color=color,
        s=size,
        label=label,
        zorder=3,
        edgecolors="black",
        linewidths=0.5,
    )
    if labels:
        for p in points:
            ax.annotate(
                p["name"],
                (p["avg_active_params"], p["score"]),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
            )
