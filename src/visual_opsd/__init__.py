"""visual-opsd: cross-modal on-policy self-distillation (Visual-OPSD, arXiv 2606.18974).

A unified multimodal model that reasons with generated visual thoughts (VTs) is distilled into the
same network run text-only: the student samples completions from the question alone, the teacher
(the same weights, live / EMA / frozen) additionally sees the privileged VT images, and a
token-level generalized JSD on the student's tokens pulls the student toward the teacher.
"""

__version__ = "0.1.0"
