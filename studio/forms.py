"""Widgets for a registered method: the shared fields (ratio, scope, selection), every field
of its config dataclass, typed by its default, with the field's help text, and, for methods
that train, how often the mask heatmap refreshes (plumbing, not a config field)."""
from __future__ import annotations

import dataclasses

import streamlit as st

BASE = ("ratio", "scope", "selection")
MAIN = ("steps", "tau", "beta_c", "beta_tv", "alpha_low", "alpha_high", "alpha_period",
        "hold_steps")                       # shown first; the rest go under "More options"


def _field_widget(container, f: dataclasses.Field, key: str):
    default, help_ = f.default, f.metadata.get("help") or None
    if isinstance(default, bool):
        return container.checkbox(f.name, default, key=key, help=help_)
    if isinstance(default, int):
        return int(container.number_input(f.name, value=default, step=1, key=key, help=help_))
    if isinstance(default, float):
        return float(container.number_input(f.name, value=default, format="%.4g", key=key,
                                            help=help_))
    text = container.text_input(f.name, "" if default is None else str(default), key=key,
                                help=help_)
    return None if default is None and not text.strip() else text


def _default_index(options: list[str], default: str) -> int:
    return options.index(default) if default in options else 0


def selector_options(spec, prefix: str) -> tuple[dict, dict]:
    """Render a registered method's fields (call inside a form); return its config options
    and the training loop's plumbing (``mask_every``) as two dicts."""
    cfg_cls, sels = spec.config, list(spec.selections)
    fields = {f.name: f for f in dataclasses.fields(cfg_cls)
              if f.default is not dataclasses.MISSING}
    c1, c2, c3 = st.columns(3)
    opts = {"ratio": c1.slider("Target parameter ratio (kept / original)", 0.05, 1.0,
                               float(fields["ratio"].default), 0.01, key=f"{prefix}_ratio"),
            "scope": c2.radio("Ratio scope", ["linear", "model"], horizontal=True,
                              index=["linear", "model"].index(fields["scope"].default),
                              key=f"{prefix}_scope",
                              help="linear: target layers only; model: whole model"),
            "selection": c3.radio("Selection", sels, horizontal=True,
                                  index=_default_index(sels, fields["selection"].default),
                                  key=f"{prefix}_selection",
                                  help="any-k keeps any subset of singular values; top-k a "
                                       "prefix")}
    rest = [f for n, f in fields.items() if n not in BASE]
    main = [f for f in rest if f.name in MAIN]
    more = [f for f in rest if f.name not in MAIN]
    cols = st.columns(4)
    for i, f in enumerate(main):
        opts[f.name] = _field_widget(cols[i % 4], f, f"{prefix}_{f.name}")
    plumbing = {}
    if spec.trains:
        plumbing["mask_every"] = int(cols[len(main) % 4].number_input(
            "mask_every", value=10, min_value=0, step=1, key=f"{prefix}_mask_every",
            help="refresh the mask heatmap every N training steps (0: never)"))
    if more:
        with st.expander("More options"):
            cols = st.columns(4)
            for i, f in enumerate(more):
                opts[f.name] = _field_widget(cols[i % 4], f, f"{prefix}_{f.name}")
    return opts, plumbing
