"""Chart and table builders: data in, plotly figure or DataFrame out. No Streamlit, no maths.

Kept pure so they are unit-tested without a server; the numbers come from ``engine``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from PIL import Image

from dashboard.text import md, plot_text
from engine.metrics import ranking, ranks

UNREVIEWED = "unreviewed"
STATUSES = (UNREVIEWED, "relabel", "drop", "keep")
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
ORACLE = "oracle"
GALLERY_COLUMNS = ["position", "index", "rank", "score", "given", "predicted", "suggested", "status", "new_label"]
# plotly's SVG scatter gets sluggish beyond a few thousand points; WebGL keeps lasso selection.
WEBGL_ABOVE = 5000


def metric_delta(before: float, after: float, *, digits: int, scale: float = 1.0, unit: str = "") -> str | None:
    """The change between two figures shown with ``digits`` decimals (after ``scale``), computed from the
    figures as shown, so 91.7 → 94.7 reads +3.0; None when they show the same (st.metric then draws no arrow)."""
    change = round(after * scale, digits) - round(before * scale, digits)
    if abs(change) < 0.5 * 10 ** -digits:
        return None
    return f"{change:+.{digits}f}{unit}"


def class_colour(label: int) -> str:
    return PALETTE[int(label) % len(PALETTE)]


def tile(image: np.ndarray, size: int) -> np.ndarray:
    """Upscale (or shrink) to ``size`` px on the long side with nearest-neighbour: pixels stay crisp."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    pil = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[2] == 1 else image)
    return np.asarray(pil.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST))


# -- the gallery ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RankedRows:
    """The gallery's rows most suspicious first, without the decisions: built once per run and method
    (sorting a million rows takes a second), then every rerun only adds the decisions (:func:`gallery_table`)."""

    table: pd.DataFrame  # GALLERY_COLUMNS but status and new_label
    row_of_index: pd.Index  # sample index → row of ``table`` (its hash table is built once, on first use)


def ranked_rows(index: np.ndarray, scores: np.ndarray, given: np.ndarray, predicted: np.ndarray,
                suggested: np.ndarray) -> RankedRows:
    order = ranking(scores)
    table = pd.DataFrame({"position": order, "index": np.asarray(index)[order],
                          "rank": np.arange(1, len(order) + 1, dtype=np.int64), "score": np.asarray(scores)[order],
                          "given": np.asarray(given)[order], "predicted": np.asarray(predicted)[order],
                          "suggested": np.asarray(suggested)[order]})
    return RankedRows(table, pd.Index(table["index"]))


def gallery_table(ranked: RankedRows, decisions: pd.DataFrame) -> pd.DataFrame:
    """One row per training row, most suspicious first, with its decision status (``GALLERY_COLUMNS``)."""
    status = np.zeros(len(ranked.table), dtype=np.int8)  # codes of STATUSES: no million strings per rerun
    new_label = np.full(len(ranked.table), -1, dtype=np.int64)
    if len(decisions):
        rows = ranked.row_of_index.get_indexer(decisions["index"])
        known = rows >= 0  # decisions on rows outside this run (another validation split) are not shown
        status[rows[known]] = pd.Index(STATUSES).get_indexer(decisions["action"].to_numpy()[known])
        new_label[rows[known]] = decisions["new_label"].to_numpy()[known]
    return ranked.table.assign(status=pd.Categorical.from_codes(status, STATUSES), new_label=new_label)


def filter_gallery(table: pd.DataFrame, *, top_k: int | None = None, given=None, suggested=None, status=None,
                   score_range: tuple[float, float] | None = None, indices=None,
                   cell: tuple[int, int] | None = None) -> pd.DataFrame:
    """The rows passing every filter given (None = no filter), still in rank order."""
    keep = np.ones(len(table), dtype=bool)
    if top_k is not None:
        keep &= table["rank"].to_numpy() <= top_k
    if given:
        keep &= table["given"].isin(given).to_numpy()
    if suggested:
        keep &= table["suggested"].isin(suggested).to_numpy()
    if status:
        keep &= table["status"].isin(status).to_numpy()
    if score_range is not None:
        keep &= table["score"].between(*score_range).to_numpy()
    if indices is not None:
        keep &= table["index"].isin(list(indices)).to_numpy()
    if cell is not None:
        keep &= ((table["given"] == cell[0]) & (table["suggested"] == cell[1])).to_numpy()
    return table[keep]


def page_of(table: pd.DataFrame, page: int, per_page: int) -> tuple[pd.DataFrame, int]:
    """Rows of 1-based ``page`` (clamped) and the number of pages (at least 1)."""
    pages = max(1, -(-len(table) // per_page))
    page = min(max(1, page), pages)
    return table.iloc[(page - 1) * per_page: page * per_page], pages


DECIDED_MARK = '<span class="il-decided"></span>'  # the page's stylesheet dims a card holding it


def card_caption(row: pd.Series, class_names: tuple[str, ...]) -> str:
    """The one line under a gallery image: rank, given → suggested, or a coloured badge once decided."""
    name = [md(c) for c in class_names]
    text = f"**#{int(row['rank'])}** {name[row['given']]} → **{name[row['suggested']]}**"
    badge = {"relabel": f":green-badge[relabeled → {name[row['new_label']]}]" if row["status"] == "relabel" else "",
             "drop": ":red-badge[dropped]", "keep": ":blue-badge[kept]"}.get(row["status"])
    return f"**#{int(row['rank'])}** {badge}{DECIDED_MARK}" if badge else text


# -- review charts --------------------------------------------------------------------------------

def validation_source(settings: dict) -> str:
    """Where a run's validation set came from, in words (the runs table)."""
    if settings.get("validation"):
        return f"trusted: {Path(settings['validation']).name}"
    if settings.get("val_from_train"):
        return f"carved {settings['val_from_train']:.0%} (untrusted)"
    return "none"


def runs_table(runs: list[dict]) -> pd.DataFrame:
    """One row per stored run (``last_used``, ``created``, ``settings``, ``methods``, ``workspace``, ``run``),
    in the order given: what it scored, against which validation set, and when."""
    def when(stamp: str) -> str:
        return (stamp or "")[:16].replace("T", " ")

    rows = [{"last used": when(r["last_used"]), "created": when(r["created"]), "data": r["settings"].get("data"),
             "methods": ", ".join(r["methods"]) or "(none yet)", "validation": validation_source(r["settings"]),
             "noise": (f"{r['settings']['noise_rate']:.0%} {r['settings'].get('noise_kind', '')}"
                       if r["settings"].get("noise_rate") else "none"),
             "epochs": r["settings"].get("epochs"), "preset": r["settings"].get("preset"),
             "differs": _differs(r["settings"], [o["settings"] for o in runs
                                                 if o["settings"].get("data") == r["settings"].get("data")]),
             "workspace": r["workspace"], "run": r["run"]} for r in runs]
    return pd.DataFrame(rows, columns=["last used", "created", "data", "methods", "validation", "noise", "epochs",
                                       "preset", "differs", "workspace", "run"])


def _differs(settings: dict, same_data: list[dict]) -> str:
    """The settings of a run that differ among the runs on its data (two runs on one folder looked the same)."""
    keys = sorted({k for other in same_data for k in {*other, *settings}
                   if len({json.dumps(o.get(k), sort_keys=True, default=str) for o in same_data}) > 1})
    return ", ".join(f"{k} {settings.get(k)}" for k in keys)


def class_counts_table(class_names: tuple[str, ...], counts: tuple[int, ...]) -> pd.DataFrame:
    """Images per class, largest first, with the share of the whole (the set-up page's data preview)."""
    table = pd.DataFrame({"class": list(class_names), "images": list(counts)})
    table["share"] = (table["images"] / max(1, table["images"].sum())).round(3)
    return table.sort_values("images", ascending=False, kind="stable").reset_index(drop=True)


def score_histogram(scores: np.ndarray, cut: float, *, method: str, flagged: int) -> go.Figure:
    """Scores of every sample in 60 bins, with the cut (the score of the last flagged sample) marked. The
    counts are binned here: a plotly histogram would send every score to the browser (a million of them)."""
    counts, edges = np.histogram(np.asarray(scores, dtype=np.float64), bins=60)
    fig = go.Figure(go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=counts, width=np.diff(edges), marker_color="#7f7f7f",
                           name="samples", customdata=np.stack([edges[:-1], edges[1:]], axis=1),
                           hovertemplate="%{customdata[0]:.4g} to %{customdata[1]:.4g}: %{y} samples<extra></extra>"))
    fig.add_vline(x=cut, line_color="#d62728", line_dash="dash",
                  annotation_text=f"top {flagged}", annotation_position="top right")
    fig.update_layout(title=f"{method} scores", xaxis_title="score (higher = more suspicious)",
                      yaxis_title="samples", height=320, margin=dict(l=10, r=10, t=40, b=10), showlegend=False,
                      bargap=0)
    return fig


def confusion_figure(counts: np.ndarray, class_names: tuple[str, ...]) -> go.Figure:
    """Given (rows) vs. suggested (columns) among flagged samples, as clickable squares.

    A scatter of squares, not a heatmap, because a point click is what Streamlit reports as a
    selection; each point carries ``customdata = [given, suggested]``.
    """
    given, suggested = np.nonzero(counts)
    values = counts[given, suggested]
    names = np.asarray([plot_text(c) for c in class_names], dtype=object)
    # white digits on the dark half of the scale, near-black on the light half: readable on every square
    dark = values > values.max(initial=0) / 2
    fig = go.Figure(go.Scatter(
        x=names[suggested], y=names[given], mode="markers+text", text=values.astype(str),
        textfont=dict(size=12, color=np.where(dark, "white", "#222").tolist()),
        customdata=np.stack([given, suggested], axis=1),
        marker=dict(symbol="square", size=34, color=values, colorscale="Reds", cmin=0, showscale=False,
                    line=dict(width=1, color="#555")),
        hovertemplate="given %{y} → suggested %{x}: %{text}<extra></extra>"))
    axis = dict(type="category", categoryorder="array", categoryarray=list(names))
    # one 34 px square per class row, plus room for the title and the axis labels: squares never overlap
    fig.update_layout(title="flagged: given vs. suggested (click a cell)", height=max(320, 110 + 38 * len(names)),
                      xaxis=dict(title="suggested", **axis), yaxis=dict(title="given", autorange="reversed", **axis),
                      margin=dict(l=10, r=10, t=40, b=10), clickmode="event+select", dragmode=False)
    return fig


def feature_map_figure(xy: np.ndarray, labels: np.ndarray, index: np.ndarray, flagged: np.ndarray,
                       class_names: tuple[str, ...]) -> go.Figure:
    """The 2-D feature map coloured by given label; flagged samples outlined. ``customdata`` = index."""
    scatter = go.Scattergl if len(xy) > WEBGL_ABOVE else go.Scatter
    fig = go.Figure()
    for c, name in enumerate(map(plot_text, class_names)):
        for is_flagged in (False, True):
            rows = np.flatnonzero((labels == c) & (flagged == is_flagged))
            if not len(rows):
                continue
            fig.add_trace(scatter(
                x=xy[rows, 0], y=xy[rows, 1], mode="markers", customdata=index[rows], legendgroup=name,
                name=f"{name} (flagged)" if is_flagged else name, showlegend=not is_flagged,
                marker=dict(color=class_colour(c), size=9 if is_flagged else 5, opacity=1.0 if is_flagged else 0.45,
                            line=dict(width=1.5 if is_flagged else 0, color="black")),
                hovertemplate=f"index %{{customdata}} · given {name}{' · flagged' if is_flagged else ''}"
                              "<extra></extra>"))
    fig.update_layout(title="feature map (lasso to filter)", height=320, dragmode="lasso",
                      margin=dict(l=10, r=10, t=40, b=10),
                      legend=dict(itemsizing="constant", orientation="h", yanchor="top", y=-0.02),
                      xaxis=dict(showticklabels=False), yaxis=dict(showticklabels=False))
    return fig


def point_customdata(point: dict) -> list:
    """The ``customdata`` of a point Streamlit reports as selected: a scalar, a list, or (for a row of
    a 2-D array) a dict keyed "0", "1", …, as the browser serialises it."""
    data = point.get("customdata")
    if isinstance(data, dict):
        return [data[k] for k in sorted(data, key=int)]
    return list(np.ravel(data))


# -- one sample -----------------------------------------------------------------------------------

def probability_figure(probabilities: np.ndarray, class_names: tuple[str, ...], *, given: int,
                       suggested: int) -> go.Figure:
    """Class probabilities; the given label red, the suggested label green."""
    colours = ["#d62728" if c == given else "#2ca02c" if c == suggested else "#9e9e9e"
               for c in range(len(class_names))]
    fig = go.Figure(go.Bar(x=[plot_text(c) for c in class_names], y=probabilities, marker_color=colours,
                           hovertemplate="%{x}: %{y:.3f}<extra></extra>"))
    fig.update_layout(title="class probabilities (red = given, green = suggested)", yaxis=dict(range=[0, 1]),
                      xaxis=dict(type="category"), height=300, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def method_table(scores: dict[str, np.ndarray], suggested: dict[str, np.ndarray], position: int,
                 class_names: tuple[str, ...]) -> pd.DataFrame:
    """Score, rank (of N) and suggested label of one row under every method."""
    rows = []
    for method, values in scores.items():
        rows.append({"method": method, "score": float(values[position]), "rank": int(ranks(values)[position]),
                     "of": len(values), "suggested": class_names[int(suggested[method][position])]})
    return pd.DataFrame(rows, columns=["method", "score", "rank", "of", "suggested"])


# -- recovery -------------------------------------------------------------------------------------

def class_accuracy_figure(before: list, after: list, class_names: tuple[str, ...]) -> go.Figure:
    """Per-class test accuracy before and after applying the decisions."""
    names = [plot_text(c) for c in class_names]
    fig = go.Figure([go.Bar(name="before", x=names, y=before, marker_color="#9e9e9e"),
                     go.Bar(name="after", x=names, y=after, marker_color="#2ca02c")])
    fig.update_layout(barmode="group", title="test accuracy per class", yaxis=dict(range=[0, 1.02]),
                      xaxis=dict(type="category"), height=320, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def cleaning_curve_figure(curve: pd.DataFrame) -> go.Figure:
    """Test accuracy after fixing the top-k of each ranking (``curve, fixed, accuracy``); oracle dashed."""
    fig = go.Figure()
    for i, (name, part) in enumerate(curve.groupby("curve", sort=False)):
        fig.add_trace(go.Scatter(x=part["fixed"], y=part["accuracy"], mode="lines+markers", name=name,
                                 line=dict(dash="dash" if name == ORACLE else "solid",
                                           color="black" if name == ORACLE else PALETTE[i % len(PALETTE)])))
    fig.update_layout(title="cleaning curve", xaxis_title="top-k samples fixed", yaxis_title="test accuracy",
                      height=360, margin=dict(l=10, r=10, t=40, b=10))
    return fig


# -- closing the loop -----------------------------------------------------------------------------

def rank_change_figure(before: np.ndarray, after: np.ndarray, reviewed: np.ndarray,
                       flipped: np.ndarray | None = None) -> go.Figure:
    """Rank of every sample before vs. after re-scoring (log axes; below the diagonal = now more
    suspicious). Reviewed samples grey; with the truth known, label errors red."""
    fig = go.Figure()
    groups = [("reviewed", reviewed, "#9e9e9e")]
    if flipped is None:
        groups.append(("not reviewed", ~reviewed, PALETTE[0]))
    else:
        groups += [("not reviewed, label correct", ~reviewed & ~flipped, PALETTE[0]),
                   ("not reviewed, label error", ~reviewed & flipped, "#d62728")]
    for name, mask, colour in groups:
        fig.add_trace(go.Scatter(x=before[mask], y=after[mask], mode="markers", name=name,
                                 marker=dict(color=colour, size=5, opacity=0.7)))
    top = int(max(before.max(), after.max()))
    fig.add_trace(go.Scatter(x=[1, top], y=[1, top], mode="lines", name="unchanged",
                             line=dict(dash="dot", color="grey")))
    fig.update_layout(title="rank before vs. after (1 = most suspicious)", height=420,
                      xaxis=dict(title="rank before", type="log"), yaxis=dict(title="rank after", type="log"),
                      margin=dict(l=10, r=10, t=40, b=10))
    return fig


def rank_change_table(index: np.ndarray, before: np.ndarray, after: np.ndarray, given: np.ndarray,
                      class_names: tuple[str, ...], *, among: np.ndarray, top: int = 15) -> pd.DataFrame:
    """The samples (of ``among``) that climbed most towards the top of the ranking."""
    frame = pd.DataFrame({"index": index, "given": np.asarray(class_names, dtype=object)[given],
                          "rank before": before, "rank after": after, "climbed": before - after})[among]
    return frame.sort_values(["climbed", "rank after"], ascending=[False, True]).head(top).reset_index(drop=True)


# -- method comparison ----------------------------------------------------------------------------

def roc_figure(curves: dict[str, dict[str, pd.DataFrame]], aurocs: dict[str, float]) -> go.Figure:
    fig = go.Figure([go.Scatter(x=c["roc"]["fpr"], y=c["roc"]["tpr"], mode="lines", name=f"{m} ({aurocs[m]:.3f})",
                                line=dict(color=PALETTE[i % len(PALETTE)])) for i, (m, c) in enumerate(curves.items())])
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="random", line=dict(dash="dot", color="grey")))
    fig.update_layout(title="ROC (AUROC)", xaxis_title="false positive rate", yaxis_title="true positive rate",
                      height=380, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def pr_figure(curves: dict[str, dict[str, pd.DataFrame]], aps: dict[str, float], noise_rate: float) -> go.Figure:
    fig = go.Figure([go.Scatter(x=c["pr"]["recall"], y=c["pr"]["precision"], mode="lines", name=f"{m} ({aps[m]:.3f})",
                                line=dict(color=PALETTE[i % len(PALETTE)])) for i, (m, c) in enumerate(curves.items())])
    fig.add_hline(y=noise_rate, line_dash="dot", line_color="grey", annotation_text="random")
    fig.update_layout(title="precision-recall (AP)", xaxis_title="recall", yaxis_title="precision",
                      yaxis=dict(range=[0, 1.02]), height=380, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def found_figure(curves: dict[str, dict[str, pd.DataFrame]], n_errors: int, n: int) -> go.Figure:
    """Label errors found vs. samples inspected, with the perfect and the random reviewer."""
    fig = go.Figure([go.Scatter(x=c["found"]["inspected"], y=c["found"]["found"], mode="lines", name=m,
                                line=dict(color=PALETTE[i % len(PALETTE)])) for i, (m, c) in enumerate(curves.items())])
    fig.add_trace(go.Scatter(x=[0, n_errors, n], y=[0, n_errors, n_errors], mode="lines", name="perfect",
                             line=dict(dash="dash", color="black")))
    fig.add_trace(go.Scatter(x=[0, n], y=[0, n_errors], mode="lines", name="random",
                             line=dict(dash="dot", color="grey")))
    fig.update_layout(title="errors found vs. samples inspected", xaxis_title="samples inspected (in ranked order)",
                      yaxis_title="label errors found", height=380, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def metrics_table(metrics: dict[str, dict[str, float]]) -> pd.DataFrame:
    """AUROC / AP / precision@k (k = number of errors) and precision at fixed depths, best AUROC first."""
    columns = {"auroc": "AUROC", "ap": "AP", "precision_at_k": "precision@k", "recall_at_k": "recall@k",
               "precision_at_1pct": "precision@1%", "precision_at_5pct": "precision@5%",
               "precision_at_10pct": "precision@10%"}
    rows = [{"method": m, **{label: v[key] for key, label in columns.items()}} for m, v in metrics.items()]
    frame = pd.DataFrame(rows, columns=["method", *columns.values()])
    return frame.sort_values("AUROC", ascending=False, kind="stable").reset_index(drop=True)


# -- how deep to review ---------------------------------------------------------------------------

MAX_CURVE_POINTS = 2000  # a 50k-row curve drawn at every depth makes the browser crawl


def review_depth_figure(estimate, threshold: float, cut: int) -> go.Figure:
    """Estimated precision against review depth (``engine.guidance.ReviewEstimate``): the precision
    of the top-d, the chance that the sample at depth d is an error, the threshold, the "review down
    to here" line and the current cut."""
    n = len(estimate.precision)
    depth = np.unique(np.linspace(1, n, min(n, MAX_CURVE_POINTS)).round().astype(int))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=depth, y=estimate.precision[depth - 1], mode="lines", name="precision of the top d",
                             line=dict(color=PALETTE[0])))
    fig.add_trace(go.Scatter(x=depth, y=estimate.marginal[depth - 1], mode="lines", name="P(error) at depth d",
                             line=dict(color=PALETTE[1], dash="dot")))
    fig.add_hline(y=threshold, line=dict(color="grey", dash="dash", width=1))
    fig.add_vline(x=max(1, estimate.stop_depth), line=dict(color=PALETTE[3], width=2),
                  annotation_text=f"review down to here ({estimate.stop_depth})", annotation_position="top right")
    fig.add_vline(x=cut, line=dict(color="black", dash="dot", width=1), annotation_text=f"cut ({cut})",
                  annotation_position="bottom right")
    fig.update_layout(title="estimated precision vs. review depth", xaxis_title="review depth (samples, by rank)",
                      yaxis_title="estimated precision", yaxis_range=[0, 1.02], height=320,
                      margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h", y=-0.25))
    return fig


# -- why it works (the guided demo; numbers from engine.demo) ----------------------------------------

DEMO_COLOURS = {"loss": "#7f7f7f", "cleanlab": PALETTE[0], "fvm": PALETTE[2], "sgd": PALETTE[3], "sam": PALETTE[2]}


def auroc_budget_figure(budgets: dict) -> go.Figure:
    """AUROC against the flipped labels vs. training epochs, one line per method (``numbers["budgets"]``)."""
    fig = go.Figure([go.Scatter(x=budgets["epochs"], y=values, mode="lines+markers", name=method,
                                line=dict(color=DEMO_COLOURS.get(method), width=3 if method == "fvm" else 2))
                     for method, values in budgets["auroc"].items()])
    fig.update_layout(title="finding the flipped labels vs. training length", xaxis_title="training epochs",
                      yaxis_title="AUROC (1 = every error ranked first)", height=360,
                      xaxis=dict(tickmode="array", tickvals=budgets["epochs"]),
                      margin=dict(l=10, r=10, t=40, b=10))
    return fig


def landscape_figure(landscape: dict, labels: dict[str, str]) -> go.Figure:
    """Validation loss along a random filter-normalised direction around θ̃ (α = 0), one line per
    fine-tune (``numbers["landscape"]``); ``labels``: optimizer → legend text."""
    fig = go.Figure([go.Scatter(x=landscape["alphas"], y=losses, mode="lines+markers", name=labels.get(opt, opt),
                                line=dict(color=DEMO_COLOURS.get(opt)))
                     for opt, losses in landscape["loss"].items()])
    fig.add_vline(x=0, line=dict(color="grey", dash="dot", width=1), annotation_text="θ̃")
    directions = len(next(iter(landscape["per_direction"].values())))
    fig.update_layout(title=f"validation loss around the validation minimum θ̃ (mean of {directions} random directions)",
                      xaxis_title="step along a random direction (in filter norms)", yaxis_title="validation loss",
                      height=360, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def demo_recovery_figure(recovery: dict) -> go.Figure:
    """Test accuracy after relabeling the top-k by FVM (k = 0: as trained), and the all-correct ceiling
    (``numbers["recovery"]``)."""
    ks = [0] + [p["k"] for p in recovery["points"]]
    accuracy = [recovery["before"]] + [p["accuracy"] for p in recovery["points"]]
    fig = go.Figure(go.Scatter(x=ks, y=accuracy, mode="lines+markers+text", name="FVM's top-k relabeled",
                               text=[f"{a:.1%}" for a in accuracy], textposition="top center",
                               line=dict(color=DEMO_COLOURS["fvm"], width=3)))
    fig.add_hline(y=recovery["clean"], line=dict(color="black", dash="dash", width=1),
                  annotation_text=f"every label correct ({recovery['clean']:.1%})", annotation_position="bottom left")
    low = min(accuracy + [recovery["clean"]])
    fig.update_layout(title="test accuracy after relabeling FVM's top k", height=360, showlegend=False,
                      xaxis=dict(title="k (images relabeled to FVM's suggestion)", tickmode="array", tickvals=ks),
                      yaxis=dict(title="test accuracy", range=[max(0.0, low - 0.05), 1.0], tickformat=".0%"),
                      margin=dict(l=10, r=10, t=40, b=10))
    return fig


def demo_caption(row: dict, class_names: list[str]) -> str:
    """Under a top-flagged image: given → suggested, and whether the given label was one we flipped."""
    verdict = "error" if row["flipped"] else "was right"
    return f"{md(class_names[row['given']])} → {md(class_names[row['suggested']])} ({verdict})"
