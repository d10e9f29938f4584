"""Journey 1: choose the data, the validation set, the demo noise, the methods and the preset; run."""

from __future__ import annotations

import json

import streamlit as st
import torch

from dashboard import charts, estimates, jobs, state, widgets
from dashboard.text import md
from engine.config import PRESETS
from engine.data import NOISE_KINDS
from engine.device import resolve_device
from engine.errors import InfluenceLensError
from engine.measured import recommended_methods
from engine.memory import check_loading, check_training
from engine.models import HEAD_MODEL
from engine.preflight import DataPreview, preview_data
from engine.runs import RunSettings, config_hash, input_shape, score_into
from engine.scorers import available_methods, scorer_class
from engine.workspace import Workspace

VALIDATION_MODES = {"none": "none", "trusted": "a trusted set (labels checked)",
                    "carve": "carve from training (untrusted)"}
DEFAULT_METHOD_COUNT = 3  # the best measured methods (engine.measured: the committed benchmark table)


def settings_form(base: RunSettings, methods_before: list[str]) -> tuple[RunSettings, list[str]]:
    """The widgets; returns the settings and methods they describe (not yet validated)."""
    left, right = st.columns(2)
    with left:
        st.subheader("Data")
        data = st.text_input("Training data", value=base.data, key="setup_data", on_change=follow_the_data,
                             help="`sample` (the embedded digits), an image folder (one sub-folder per class), "
                                  "a CSV manifest (`path,label`) or an `.npz`. Your files are never modified.")
        sample = is_sample(data)
        if not sample:
            data_preview(data.strip())
        mode_index = 1 if base.validation else 2 if base.val_from_train else 0
        mode = st.radio("Validation set (needed by the methods marked ✱)", list(VALIDATION_MODES),
                        index=seeded("setup_val_mode", mode_index, 0),
                        format_func=VALIDATION_MODES.get, horizontal=True, key="setup_val_mode")
        if mode == "none":
            carve_suggestion()
        validation, carve = None, None
        if mode == "trusted":
            validation = st.text_input("Trusted validation set", key="setup_val", value=seeded(
                "setup_val", base.validation or ("sample:val" if sample else ""), ""))
        elif mode == "carve":
            carve = st.slider("Fraction carved out of training", 0.05, 0.4, base.val_from_train or 0.1, 0.05,
                              key="setup_carve")
        test = st.text_input("Test set (for retraining)", key="setup_test",
                             value=seeded("setup_test", base.test or ("sample:test" if sample else ""), ""),
                             help="A clean held-out set; the recovery page reports accuracy on it.")
        demo = st.toggle("Demo: inject label noise (the truth is then known)",
                         value=seeded("setup_demo", base.noise_rate > 0, False),
                         key="setup_demo")
        rate, kind = 0.0, base.noise_kind
        if demo:
            c1, c2 = st.columns(2)
            rate = c1.slider("Noise rate", 0.01, 0.5, base.noise_rate or 0.1, 0.01, key="setup_rate")
            kind = c2.selectbox("Noise kind", NOISE_KINDS, index=NOISE_KINDS.index(base.noise_kind), key="setup_kind")
    with right:
        st.subheader("Methods and training")
        names = available_methods()
        has_validation = bool(validation or carve)
        runnable = [m for m in names if has_validation or not scorer_class(m).requires_validation]
        default = [m for m in methods_before if m in names] or recommended_methods(runnable, DEFAULT_METHOD_COUNT)
        methods = st.multiselect(
            "Methods (several at once share one trained model)", names, key="setup_methods",
            default=seeded("setup_methods", default, None),
            format_func=lambda m: f"{m} ✱" if scorer_class(m).requires_validation else m,
            help="\n".join(f"- **{m}**: {scorer_class(m).description}" for m in names))
        preset = st.radio("Preset", list(PRESETS), index=list(PRESETS).index(base.preset), horizontal=True,
                          key="setup_preset")
        c1, c2, c3 = st.columns(3)
        epochs = c1.number_input("Epochs", 1, 500, base.epochs or PRESETS[preset].epochs, key=f"setup_epochs_{preset}")
        seed = c2.number_input("Seed", 0, 2**31 - 1, base.seed, key="setup_seed")
        devices = ["preset", "auto", "cpu", "cuda"]
        device = c3.selectbox("Device", devices, index=devices.index(base.device or "preset"), key="setup_device")
        start = model_form(base)
    settings = RunSettings(data=data.strip(), validation=(validation or "").strip() or None, val_from_train=carve,
                           test=test.strip() or None, noise_rate=float(rate), noise_kind=kind, preset=preset,
                           epochs=int(epochs), seed=int(seed), device=None if device == "preset" else device, **start)
    return settings, methods


def model_form(base: RunSettings) -> dict:
    """Bring your model (engine.start, engine.frozen): the RunSettings fields of the CLI's options of the same names."""
    with st.expander("Bring your model", expanded=bool(base.weights or base.backbone or base.embeddings)):
        weights = st.text_input("Weights file (.pt / .safetensors state_dict)", base.weights or "",
                                key="setup_weights", help="for the built-in small-cnn / resnet18 (the preset's model)")
        backbone = st.text_input("Backbone file (TorchScript)", base.backbone or "", key="setup_backbone",
                                 help="maps N×C×H×W images to N×D features; a linear head is trained on top")
        embeddings = st.text_input("Embeddings file (.npy, N×D)", base.embeddings or "", key="setup_embeddings",
                                   help="row i for the sample of index i")
        c1, c2 = st.columns(2)
        freezes = ["backbone", "none"]
        freeze = c1.selectbox("Freeze", freezes, index=freezes.index(base.freeze or "backbone"), key="setup_freeze",
                              help="backbone: features once, the head alone is trained (fast, exact last-layer "
                                   "methods); none: fine-tune every layer from the weights")
        size = c2.number_input("Image size (0: as loaded)", 0, 4096, base.image_size or 0, key="setup_image_size")
    start = {"weights": weights.strip() or None, "backbone": backbone.strip() or None,
             "embeddings": embeddings.strip() or None, "image_size": int(size) or None}
    return {**start, "freeze": freeze if start["weights"] or start["backbone"] or start["embeddings"] else None}
# -- defaults that follow the data, and a preview of it before Run ---------------------------------

def seeded(key: str, value, unset):
    """``value`` as a widget's default until the session holds the widget's value (set by the user or by
    :func:`follow_the_data`), then ``unset``: given both, Streamlit logs a warning with a stack trace."""
    return unset if key in st.session_state else value


def is_sample(data: str) -> bool:
    return data.strip() == "sample" or data.strip().startswith("sample:")


def data_defaults(data: str) -> dict[str, object]:
    """Widget values that fit ``data``: on the sample digits, its trusted validation and test splits and
    the demo noise (the truth is then known); on own data none of them (the digits' splits have other
    classes, and noise is injected only when asked)."""
    sample = is_sample(data)
    return {"setup_val_mode": "trusted" if sample else "none", "setup_val": "sample:val" if sample else "",
            "setup_test": "sample:test" if sample else "", "setup_demo": sample}


def follow_the_data() -> None:
    """Callback of the data input: reset what depended on the previous data (methods that would then
    lack a validation set are taken out; if none is left, the best measured ones that need none)."""
    defaults = data_defaults(st.session_state["setup_data"])
    st.session_state.update(defaults)
    if defaults["setup_val_mode"] == "none" and "setup_methods" in st.session_state:
        kept = [m for m in st.session_state["setup_methods"] if not scorer_class(m).requires_validation]
        # every chosen method (the ✱ defaults) needed a validation set: the best measured ones that need none
        st.session_state["setup_methods"] = kept or recommended_methods(
            [m for m in available_methods() if not scorer_class(m).requires_validation], DEFAULT_METHOD_COUNT)


def use_carved_validation() -> None:
    st.session_state["setup_val_mode"] = "carve"


def carve_suggestion() -> None:
    """Without a validation set VM / FVM cannot run: offer to carve one, and say what that means."""
    st.caption("No validation set: the methods marked ✱ need one. **Carving** holds out a random share of your "
               "training images as the validation set: they are then not scored, and their labels are trusted "
               "unchecked (a set you checked by hand is better).")
    st.button("Carve a validation set", key="setup_suggest_carve", on_click=use_carved_validation,
              icon=":material/content_cut:")


@st.cache_data(max_entries=16, ttl=300, show_spinner="Reading the data…")
def _preview(data: str) -> DataPreview:
    return preview_data(data)


def data_preview(data: str) -> None:
    """What the run will see: images, classes and counts, sizes and what gets resized (or why it cannot)."""
    if not data:
        return
    try:
        preview = _preview(state.readable(data))  # with a data root: only under it, the same words either way
    except InfluenceLensError as exc:
        st.warning(md(exc), icon=":material/folder_off:")
        return
    shape = preview.image_shape
    size = f"{shape[1]}×{shape[0]} {'RGB' if len(shape) == 3 else 'grayscale'}"
    sizes = ", ".join(f"{k} ({v:,})" for k, v in list(preview.sizes.items())[:4])
    resized = (f"; **{preview.resized:,}** of other sizes will be resized to {size}" if preview.resized
               else "")
    read = (f" (sizes read from {preview.headers_read:,} files)" if preview.headers_read < preview.images else "")
    unreadable = (f"; {preview.unreadable} unreadable file(s) will be left out" if preview.unreadable else "")
    with st.container(border=True, key="setup_preview"):
        st.markdown(f"**{preview.images:,}** images in **{len(preview.class_names)}** classes, trained as {size}; "
                    f"sizes: {sizes}{read}{resized}{unreadable}.")
        rows = len(preview.class_names)  # as tall as its rows (a fixed height left empty rows under 4 classes)
        st.dataframe(charts.class_counts_table(preview.class_names, preview.counts), hide_index=True,
                     height=min(180, 35 * (rows + 1) + 3), key="setup_preview_counts")


def time_estimate_line(settings: RunSettings, methods: list[str]) -> str | None:
    """The time the run will take here, from a throughput measured on this device (engine.preflight)."""
    try:
        preview = _preview(state.readable(settings.data))
        config = state.readable_settings(settings).train_config()
        n = round(preview.images * (1 - (settings.val_from_train or 0)))
        shape = input_shape(state.readable_settings(settings), preview.image_shape)
        estimate = estimates.run_time(n, shape, len(preview.class_names), config, methods)
    except InfluenceLensError:  # said by the preview or the device line already
        return None
    took = estimates.duration
    extra = "".join(f", {m} adds ≈ {took(s)}" for m, s in estimate.method_seconds.items())
    features = (f"the backbone over {n:,} images ≈ {took(estimate.feature_seconds)} (decoding the files comes on "
                "top), then " if estimate.feature_seconds else "")
    return (f"Estimated time on this device: **≈ {took(estimate.total_seconds)}** ({features}training {config.epochs} "
            f"epochs of {n:,} {'feature rows' if estimate.model == HEAD_MODEL else 'images'} ≈ "
            f"{took(estimate.training_seconds)} at {estimate.images_per_second:,.0f}/s measured with "
            f"{estimate.model}{extra}; scoring adds less than one training).")


def device_line(settings: RunSettings) -> str:
    device = resolve_device(settings.train_config().device)
    if device.type == "cuda":
        return f"Device: **{torch.cuda.get_device_name(device)}** (cuda)"
    threads = settings.train_config().threads
    return f"Device: **cpu** (training on {threads} thread{'s' if threads > 1 else ''}, the recipe's)"


def start_run(settings: RunSettings, methods: list[str]) -> None:
    """Load the data, open its workspace, and score what is not stored yet (in the background)."""
    checked = state.readable_settings(settings)  # every path it reads, under the data root when there is one
    checked.validate()
    if not methods:
        raise InfluenceLensError("choose at least one method")
    needing = [m for m in methods if scorer_class(m).requires_validation]
    if needing and not (settings.validation or settings.val_from_train):
        raise InfluenceLensError(f"{', '.join(needing)} need a validation set: give a trusted one, or carve one "
                                 "out of the training data")
    for spec in (checked.data, checked.validation, checked.test):  # memory checked before it is asked for
        if spec is not None:
            check_loading(spec, checked.image_size, override=None)
    data = state.run_data(json.dumps(settings.to_dict(), sort_keys=True))
    check_training(data.train, checked.train_config(), methods, override=None)
    if data.full_train.skipped:
        st.warning(f"{len(data.full_train.skipped)} unreadable file(s) left out: "
                   + "; ".join(md(s) for s in data.full_train.skipped[:5]))
    for part in (data.full_train, data.validation, data.test):
        for note in part.notes if part is not None else ():
            st.info(md(note))
    for note in data.notes:
        st.info(md(note))
    workspace = Workspace.for_data(settings.data_key(), state.folder())
    key = config_hash(settings, data)
    state.activate(workspace, key, settings)
    workspace.save_run(key, settings.to_dict())
    if all(m in workspace.methods(key) for m in methods):
        st.session_state["flash"] = ("Every method was already computed for this configuration: loaded from the "
                                     "workspace.")
        st.switch_page("views/review.py")
    models = state.models()

    def work(progress):
        _, trained = score_into(workspace, checked, data, methods, trained=models.get(key), progress=progress)
        models[key] = trained
        return trained

    job_key = jobs.key_for("score", workspace.path, key)
    jobs.start(job_key, "Scoring", work)
    st.session_state["awaiting"] = job_key


st.title("Set up a run")
widgets.status_bar()
run = state.active()
data_arg = state.app_args().data
# On the sample data: its trusted validation split (VM/FVM need one), and the demo noise on, so the
# first run shows what the tool finds against a known truth. 20% pair noise (digit c labelled c+1)
# is the telling demo: it costs ~7 points of test accuracy (symmetric noise barely any) and
# separates the methods (loss AUROC ~0.965, FVM ~0.999 at 15 epochs).
on_sample = data_arg == "sample"
base = run.settings if run else RunSettings(data=data_arg, validation="sample:val" if on_sample else None,
                                            noise_rate=0.2 if on_sample else 0.0,
                                            noise_kind="pair" if on_sample else "symmetric")
settings, methods = settings_form(base, run.methods if run else [])
try:
    st.markdown(device_line(state.readable_settings(settings)))  # its file checks only under the data root
except InfluenceLensError as exc:
    st.warning(md(exc))
estimate = time_estimate_line(settings, methods)
if estimate:
    st.markdown(estimate)

run_failed = False
if st.button("Run", type="primary", icon=":material/play_arrow:", key="run", shortcut="Ctrl+Enter"):
    try:
        start_run(settings, methods)
    except InfluenceLensError as exc:
        st.error(md(exc))
        run_failed = True

run = state.active()
if run is not None and not run_failed:  # a failed Run shows its error alone, not the previous run's status
    job_key = jobs.key_for("score", run.workspace.path, run.key)
    job = jobs.get(job_key)
    if job is not None and job.running and st.session_state.get("awaiting") == job_key and run.ready:
        del st.session_state["awaiting"]  # the first method is stored: review it while the others run
        st.session_state["flash"] = f"{', '.join(run.methods)} ready; the other methods are still running."
        st.switch_page("views/review.py")
    if job is not None and job.running:
        stored = len(run.methods)
        jobs.watch(job_key, rerun_when=lambda: len(run.workspace.methods(run.key)) > stored)
    elif job is not None:  # said once, then forgotten: the workspace keeps the results
        jobs.forget(job_key)
        if job.error:
            st.error(f"Scoring failed: {md(job.error)}")
        else:
            st.success(f"Scored {', '.join(run.methods)} in {job.seconds:.1f} s.")
        if st.session_state.pop("awaiting", None) == job_key and not job.error:
            st.session_state["flash"] = f"Scored {', '.join(run.methods)} in {job.seconds:.1f} s."
            st.switch_page("views/review.py")

st.divider()
st.subheader("Runs in this workspace folder")
st.caption(f"Workspace folder: {md(state.folder())} (one SQLite file per dataset; results are cached per "
           "configuration).")
known = state.known_runs()
if known.empty:
    st.caption("None yet.")
else:
    st.caption("Click a row to open that run.")
    picked = st.dataframe(known, hide_index=True, on_select="rerun", selection_mode="single-row", key="known_runs")
    rows = picked["selection"]["rows"]
    if rows:  # the table leaves the page with the switch, so its selection does not outlive the click
        chosen = known.iloc[rows[0]]
        state.open_run(chosen["workspace"].removesuffix(".sqlite"), chosen["run"])
        st.session_state["flash"] = f"Opened the run of {chosen['last used']} ({chosen['methods']})."
        st.switch_page("views/review.py")
