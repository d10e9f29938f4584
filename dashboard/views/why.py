"""Why it works: a guided five-minute demo for stakeholders, on data with injected noise (the truth is known).

The numbers come from :func:`engine.demo.run_demo`, computed once in the background and cached in
the workspace folder, so on stage the four steps render at once.
"""

from __future__ import annotations

from dataclasses import replace

import streamlit as st

from dashboard import charts, estimates, jobs, state, widgets
from dashboard.text import md
from engine.config import PRESETS
from engine.data import NOISE_KINDS
from engine.demo import (
    DEMO_METHODS,
    LANDSCAPE_OPTIMIZERS,
    DemoSettings,
    budget_story,
    cached_demo,
    landscape_story,
    load_demo_data,
    recovery_headline,
    run_demo,
)
from engine.errors import InfluenceLensError


@st.cache_data(max_entries=8, show_spinner="Reading the demo data…")
def _demo_shape(settings: DemoSettings) -> tuple[int, int, tuple[int, ...], int]:
    data = load_demo_data(settings)
    return len(data.noisy), len(data.validation), data.noisy.image_shape, data.noisy.num_classes


def demo_time_line(settings: DemoSettings) -> str | None:
    """At least how long preparing takes here (520 s for the full demo on the sample, said nowhere before):
    each budget's training with cleanlab's folds and θ̃'s SAM fine-tune (two passes a step) on the validation
    set, one retraining per depth and the clean ceiling at the largest budget, and the landscape's two
    fine-tunes. The scoring and the landscape's evaluations come on top."""
    try:
        n, n_val, shape, classes = _demo_shape(settings)
        per_epoch = estimates.run_time(n, shape, classes, replace(PRESETS[settings.preset], epochs=1), DEMO_METHODS)
    except InfluenceLensError:
        return None
    epochs = sum(settings.budgets) + (len(settings.depths) + 1) * max(settings.budgets)
    finetune_images = (2 * len(settings.budgets) + 2) * settings.finetune_epochs * n_val
    seconds = (sum(settings.budgets) * sum(per_epoch.method_seconds.values()) + epochs * per_epoch.training_seconds
               + finetune_images / per_epoch.images_per_second)
    return (f"Estimated time on this device: **at least ≈ {estimates.duration(seconds)}** ({epochs} epochs of "
            f"training on {n:,} images at {per_epoch.images_per_second:,.0f} images/s, cleanlab's folds at each "
            f"budget, and the fine-tunes on {n_val:,} validation images; the scoring and the landscape's "
            f"evaluations come on top).")


def demo_settings() -> DemoSettings:
    with st.expander("Demo settings", expanded=False):
        c1, c2, c3, c4 = st.columns([3, 2, 2, 2])
        data = c1.text_input("Data", value=state.app_args().data, key="why_data",
                             help="`sample` (the digits), or e.g. `../shared/data/cifar10_test_jpegq75.npz`; "
                                  "without `sample`, a clean validation and test set are carved out of it.")
        rate = c2.slider("Injected noise", 0.05, 0.5, 0.2, 0.05, key="why_rate")
        kind = c3.selectbox("Noise kind", NOISE_KINDS, index=NOISE_KINDS.index("symmetric"), key="why_kind")
        quick = c4.toggle("Quick rehearsal", value=False, key="why_quick",
                          help="Short budgets and fine-tunes: under a minute on the digits, a weaker story.")
    try:
        path = state.readable(data.strip())  # with a data root: only under it, the same words either way
    except InfluenceLensError as exc:
        st.error(md(exc))
        st.stop()
    settings = DemoSettings(data=path, noise_rate=float(rate), noise_kind=kind)
    return settings.quick() if quick else settings


def prepare(settings: DemoSettings, folder, job_key: str) -> None:
    """Start the precompute in the background (the page shows its progress)."""
    jobs.start(job_key, "Preparing the demo", lambda progress: run_demo(settings, folder, progress=progress))


st.title("Why it works")
widgets.status_bar()
settings = demo_settings()
folder = state.folder() / "demo"
job_key = jobs.key_for("demo", folder, settings.key())
try:
    result = cached_demo(settings.validate(), folder)
except InfluenceLensError as exc:
    st.error(md(exc))
    st.stop()
job = jobs.get(job_key)
running = job is not None and job.running
if result is None:
    st.markdown(f"Trains the model {len(settings.budgets)} times ({', '.join(map(str, settings.budgets))} epochs) "
                f"on **{settings.data}** with {settings.noise_rate:.0%} {settings.noise_kind} label noise injected, "
                "then prepares the four steps below. Prepare it before the meeting: it is stored, and shown at once "
                "from then on.")
    if not running and (line := demo_time_line(settings)) is not None:
        st.markdown(line)  # said before the button
    st.button("Prepare the demo", type="primary", icon=":material/play_arrow:", key="why_prepare", disabled=running,
              on_click=prepare, args=(settings, folder, job_key))
if running:
    jobs.watch(job_key)
elif job is not None:
    if job.error:
        st.error(f"Preparing the demo failed: {md(job.error)}")
    jobs.forget(job_key)
if result is None:
    st.stop()

numbers = result.numbers
data, names = numbers["data"], numbers["data"]["class_names"]
budgets, landscape, top, recovery = (numbers[k] for k in ("budgets", "landscape", "top", "recovery"))
st.caption(f"{md(data['source'])}: {data['train']} training images, {data['flipped']} of them given a wrong label on "
           f"purpose ({settings.noise_rate:.0%} {settings.noise_kind}); trusted validation set {data['validation']}, "
           f"test set {data['test']}. Prepared in {numbers['seconds']:.0f} s.")

with st.container(key="why_budgets"):
    story = budget_story(budgets)  # the words follow the measured AUROCs (a quick rehearsal may contradict)
    st.subheader(f"1 · {story.headline}")
    st.markdown(story.text)
    st.plotly_chart(charts.auroc_budget_figure(budgets), key="why_budgets_chart")

with st.container(key="why_landscape"):
    headline, text = landscape_story(landscape)
    st.subheader(f"2 · {headline}")
    st.markdown(text)
    st.plotly_chart(charts.landscape_figure(landscape, LANDSCAPE_OPTIMIZERS), key="why_landscape_chart")

with st.container(key="why_top"):
    st.subheader("3 · What FVM flags first, and what it suggests")
    st.markdown(f"The {len(top['rows'])} images FVM finds most suspicious after {top['epochs']} epochs, each with "
                f"the label it was given → the label FVM suggests: **{top['flipped_in_top']}** of them are labels "
                "we flipped (marked *error*).")
    widgets.tiles(result.images, [charts.demo_caption(row, names) for row in top["rows"]], per_row=8, size=96)

with st.container(key="why_recovery"):
    st.subheader(f"4 · {recovery_headline(recovery)}")
    points = recovery["points"]
    best = max(points, key=lambda p: p["accuracy"]) if points else None
    st.markdown(f"Relabeling FVM's top k with its suggestions and retraining with the same recipe takes test accuracy "
                f"from **{recovery['before']:.1%}**"
                + (f" to **{best['accuracy']:.1%}** (k = {best['k']}, {best['relabeled_right']} of "
                   f"{best['relabeled']} relabels right)" if best else "")
                + f"; with every label correct it would be {recovery['clean']:.1%}.")
    st.plotly_chart(charts.demo_recovery_figure(recovery), key="why_recovery_chart")
