"""Widgets for a selector's config dataclass: the shared fields (ratio, scope, selection) and
then every method-specific field, typed by its default, with the field's help text."""
from __future__ import annotations

import dataclasses

import streamlit as st

BASE = ("ratio", "scope", "selection")
MAIN = ("steps", "tau", "beta_c", "beta_tv", "alpha_low", "alpha_high", "alpha_period",
        "hold_steps")                       # shown first; the rest go under "More options"
HIDDEN = ("checkpoint", "checkpoint_every", "log_path", "cache_dir")   # files: CLI only


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


def selections(cfg_cls) -> list[str]:
    """The selections a method offers (learned any-k methods: both)."""
    return list(cfg_cls.supported_selections)


def selector_options(cfg_cls, prefix: str) -> dict:
    """Render the config's fields (call inside a form); return them as a dict."""
    fields = {f.name: f for f in dataclasses.fields(cfg_cls)
              if f.default is not dataclasses.MISSING}
    c1, c2, c3 = st.columns(3)
    opts = {"ratio": c1.slider("Target parameter ratio (kept / original)", 0.05, 1.0,
                               float(fields["ratio"].default), 0.01, key=f"{prefix}_ratio"),
            "scope": c2.radio("Ratio scope", ["linear", "model"], horizontal=True,
                              index=["linear", "model"].index(fields["scope"].default),
                              key=f"{prefix}_scope",
                              help="linear: target layers only; model: whole model"),
            "selection": c3.radio("Selection", selections(cfg_cls), horizontal=True,
                                  index=_default_index(selections(cfg_cls),
                                                       fields["selection"].default),
                                  key=f"{prefix}_selection",
                                  help="any-k keeps any subset of singular values; top-k a "
                                       "prefix")}
    rest = [f for n, f in fields.items() if n not in BASE and n not in HIDDEN]
    main = [f for f in rest if f.name in MAIN]
    more = [f for f in rest if f.name not in MAIN]
    cols = st.columns(4)
    for i, f in enumerate(main):
        opts[f.name] = _field_widget(cols[i % 4], f, f"{prefix}_{f.name}")
    if more:
        with st.expander("More options"):
            cols = st.columns(4)
            for i, f in enumerate(more):
                opts[f.name] = _field_widget(cols[i % 4], f, f"{prefix}_{f.name}")
    return opts
