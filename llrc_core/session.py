"""A comparison's session: the loaded model, its calibration and evaluation data and its
decompositions, shared by every cell of a grid (``compare.run_cells``), the app's Compare page
and the benches."""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .compare import CompareConfig


class Session:
    """The loaded model, its calibration and evaluation data (made at once, while the model is
    dense) and its decompositions (made lazily, on a cell's first need).

    A caller that already holds these (the app: a copy of its cached model, the session's
    calibration windows, decompositions and polish windows) passes them in; cells then
    compress ``loaded`` in place and restore it after each cell, so pass a model nobody else
    is using.
    """

    def __init__(self, cfg: CompareConfig, log: Callable[[str], None], loaded=None,
                 windows=None, decs: dict | None = None, polish_windows=None):
        from .models import load_model
        from .pipeline import calibrate, full_rank_windows
        from .refit import refit_windows
        self.cfg, self.log = cfg, log
        self.loaded = loaded if loaded is not None else load_model(
            cfg.model, cfg.device, allow_compressed=cfg.allow_compressed)
        n_calib = cfg.n_calib or full_rank_windows(self.loaded.model, cfg.seq_len)
        self.windows = windows if windows is not None else calibrate(
            self.loaded, cfg.calib, n_calib, cfg.seq_len, cfg.seed)
        self.decs: dict = dict(decs or {})
        self.out: Path | None = None
        self.polish = self._polish_setup(polish_windows)
        # None unless refit_windows > 0, which CompareConfig allows only with refit on
        self.refit_ids = refit_windows(self.loaded, cfg.calib, cfg.refit_windows, cfg.seq_len,
                                       cfg.seed)
        self._eval = self._eval_data()      # now, while the model is still dense

    def _polish_setup(self, ids):
        """``(PolishConfig, its windows)`` when the grid polishes, else ``(None, None)``;
        ``ids``: windows the caller made (the app: its calibration is not ``cfg.calib``)."""
        from .polish import PolishConfig, polish_windows
        if not self.cfg.polish:
            return None, None
        pc = PolishConfig(rounds=self.cfg.polish)
        return pc, (polish_windows(self.loaded, self.cfg.calib, pc, self.cfg.seed)
                    if ids is None else ids)

    def _eval_data(self):
        """Perplexity windows (causal LM), or the lines and their reference embeddings from
        the dense model (encoder): made before any cell compresses the model, so a resumed
        run (dense cell cached) still compares against the original."""
        from . import fidelity
        from .evaluate import eval_windows
        cfg, model, tok = self.cfg, self.loaded.model, self.loaded.tokenizer
        if self.loaded.causal:
            return eval_windows(tok, cfg.eval_text, cfg.eval_seq_len, cfg.max_eval_windows,
                                cfg.eval_sample)
        lines = fidelity.wiki_lines(cfg.eval_text, cfg.fidelity_lines)
        return lines, fidelity.embed(model, tok, lines)

    def dec(self, name: str):
        from .pipeline import decompose_model
        if name not in self.decs:
            self.log(f"decomposing ({name})")
            self.decs[name] = decompose_model(self.loaded.model, name, self.windows,
                                              batch_size=self.cfg.batch_size)
        return self.decs[name]

    def evaluate(self, model=None) -> dict:
        """ppl (+ task accuracies) for a causal LM, embedding fidelity for an encoder, of
        ``model`` (default: the session's)."""
        from . import fidelity
        cfg, tok = self.cfg, self.loaded.tokenizer
        model = self.loaded.model if model is None else model
        t0 = time.time()
        if not self.loaded.causal:
            lines, ref = self._eval
            out = {"fidelity": fidelity.mean_cosine(ref, fidelity.embed(model, tok, lines))}
        else:
            from .evaluate import eval_info, perplexity
            out = {"ppl": perplexity(model, self._eval, cfg.batch_size)["ppl"],
                   **eval_info(self._eval, cfg.eval_text, cfg.eval_sample)}
            if cfg.tasks:
                from .zeroshot import evaluate_tasks
                res = evaluate_tasks(model, tok, cfg.tasks, limit=cfg.task_limit,
                                     batch_size=cfg.batch_size)
                out.update({f"acc_{t}": r["acc"] for t, r in res.items()})
        out["eval_seconds"] = time.time() - t0
        return out
