"""Diagnostics: do a unified model's visual thoughts (VTs) carry their weight?

Three measurements (docs/method.md section 1), each a plain function of a `Backend` and samples that
returns a flat `/`-namespaced dict of numbers (verl-style), plus writers for JSON / markdown / PNG:

- `interventions` (interventions.py): accuracy per task, with 95% Wilson intervals, when the VT the
  model reasons with is its own (`interleaved`), absent (`text_only`), Gaussian noise (`noise`),
  another sample's (`shuffled`) or the ground truth (`oracle`).
- `attention_fractions` (attention.py): per layer, the fraction of attention mass a text span sends
  to an image span, averaged over heads and query tokens: text before the VT -> input image, text
  after the VT -> VT, text after the VT -> input image; for generated and for noise VTs.
- `kl_diagnostic` (kl.py): K = mean over completions of the mean over their tokens of
  KL(p(. | C_T, y<t) || p(. | C_S, y<t)), the same ids y scored under both contexts by the same
  weights; K_post of trained models with either weights on the teacher side, and the gap closure
  1 - K_post / K_pre, for each completion source (the data's traces: identical tokens before and
  after, the headline; the models' own samples). `kl_sanity` checks the pipeline (identical
  contexts: exactly 0; swapped contexts: the reverse KL).

Each module's docstring holds its exact definition. `diagnose(cfg)` (run.py) runs any of them from a
`DiagnoseConfig` and writes the outputs; `run_diagnose` is the command
`visual-opsd diagnose {interventions,attention,kl,all}`; `report_fields` turns results into the
`interventions` / `kl` entries of the study's report.json.
"""

from visual_opsd.diagnostics.attention import ATTENTION_SPANS, attention_fractions, span_fraction, trace_fractions
from visual_opsd.diagnostics.common import load_backend
from visual_opsd.diagnostics.interventions import INTERVENTION_MODES, interventions
from visual_opsd.diagnostics.kl import (
    contexts_for,
    highlight_html,
    kl_diagnostic,
    kl_sanity,
    student_completions,
    token_kl,
    token_table,
)
from visual_opsd.diagnostics.output import write_diagnostic
from visual_opsd.diagnostics.run import DiagnoseConfig, diagnose, diagnose_samples, report_fields, run_diagnose

__all__ = [
    "ATTENTION_SPANS",
    "INTERVENTION_MODES",
    "DiagnoseConfig",
    "attention_fractions",
    "contexts_for",
    "diagnose",
    "diagnose_samples",
    "highlight_html",
    "interventions",
    "kl_diagnostic",
    "kl_sanity",
    "load_backend",
    "report_fields",
    "run_diagnose",
    "span_fraction",
    "student_completions",
    "token_kl",
    "token_table",
    "trace_fractions",
    "write_diagnostic",
]
