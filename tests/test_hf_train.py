"""Visual-OPSD training on the Hugging Face backend: what the loss compares.

- a `max_length` that cuts completions: each completion is cut once, to the room the teacher
  context leaves, so student and teacher score the very same ids and no trained position has a
  teacher target from a padded (zero) hidden state, i.e. a uniform one;
- LoRA dropout: the student is scored, with gradients, by the policy that sampled (dropout off).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import visual_opsd.train as train_module  # noqa: E402
from visual_opsd.backends.hf import HFBackend, unwrap  # noqa: E402
from visual_opsd.backends.hf_config import HFOptions  # noqa: E402
from visual_opsd.config import load_config  # noqa: E402
from visual_opsd.rollout import Rollout, fit_rollout  # noqa: E402
from visual_opsd.sft import load_samples  # noqa: E402
from visual_opsd.tasks import get_task  # noqa: E402
from visual_opsd.teacher import Teacher  # noqa: E402
from visual_opsd.train import LossConfig, TrainConfig, distill_loss, open_run, run_train  # noqa: E402
from visual_opsd.vt import teacher_contexts  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ROOM = 3  # completion tokens the teacher context leaves under max_length in the truncation tests


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL saved like an SFT result (read-only)."""
    path = tmp_path_factory.mktemp("hf") / "base"
    HFBackend.tiny("qwen2_5_vl").save(path)
    return path


def run_args(base: Path, out: Path, **extra) -> list[str]:
    values = {"init_from": base, "out_dir": out, "threads": 1, "progress": "false", "data.sizes": "[3,3]",
              "data.n_train": 4, "data.n_val": 0, "optim.steps": 1, "optim.prompts_per_step": 2,
              "optim.warmup_steps": 0, "rollout.n": 2, "rollout.max_new_tokens": 16, "save_every": 1,
              "teacher.mode": "frozen", **extra}
    return [f"{k}={v}" for k, v in values.items()]


def teacher_budget(base: Path, args: list[str]) -> int:
    """A `max_length` that leaves ROOM completion tokens after the longest teacher context of the
    run's training samples (the student contexts, without VTs, leave many more)."""
    cfg = load_config(TrainConfig, None, args)
    backend = HFBackend.load(base)
    train = load_samples(cfg.data, get_task(cfg.data.task), "train", backend.cell_px)
    t_ctx = teacher_contexts(backend, train, train, "data", torch.Generator().manual_seed(0))
    s_len = max(len(backend.build_context(s, "student").ids) for s in train)
    limit = max(len(c.ids) for c in t_ctx) + ROOM
    assert limit - s_len > ROOM + 8, "the student's room must be far larger than the teacher's"
    return limit


class Spy:
    """Records every `HFBackend.score` call and what the loss function got (teacher targets, mask)."""

    def __init__(self, monkeypatch, fused: bool):
        self.scores: list[tuple[str, list[list[int]], list[int], object]] = []
        self.losses: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        score = HFBackend.score

        def spy_score(backend, contexts, completions, **kw):
            out = score(backend, contexts, completions, **kw)
            self.scores.append((contexts[0].role, [list(c) for c in completions], [len(c.ids) for c in contexts], out))
            return out

        monkeypatch.setattr(HFBackend, "score", spy_score)
        name = "fused_linear_generalized_jsd" if fused else "generalized_jsd"
        loss = getattr(train_module, name)

        def spy_loss(student, teacher, *args, mask=None, **kw):
            if fused:  # (hidden, hidden, head): the teacher's logits from its hidden states and head
                head = kw.get("teacher_weight")
                head = args[0] if head is None else head
                self.losses.append((teacher.detach() @ head.detach().T, mask, teacher.detach()))
            else:
                self.losses.append((teacher.detach(), mask, None))
            return loss(student, teacher, *args, mask=mask, **kw)

        monkeypatch.setattr(train_module, name, spy_loss)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_teacher_targets_are_never_uniform_where_the_student_trains(hf_base, tmp_path, monkeypatch, fused):
    """One Visual-OPSD step whose teacher context leaves ROOM tokens under max_length while the
    student's leaves many more (its rollouts run longer): every trained position has a real teacher
    target (never logits from a zeroed hidden state: uniform over the top-k), and both sides scored
    the very same ids, each one in full."""
    args = run_args(hf_base, tmp_path / "run", **{"loss.fused": str(fused).lower()})
    limit = teacher_budget(hf_base, args)
    spy = Spy(monkeypatch, fused)
    run_train(load_config(TrainConfig, None, [*args, "backend.kind=hf", f"backend.max_length={limit}"]))

    trained = uniform = zeroed = 0
    for t_logits, mask, t_hidden in spy.losses:
        mask = mask.bool()
        spread = t_logits.amax(-1) - t_logits.amin(-1)  # 0: every id equally likely
        trained += int(mask.sum())
        uniform += int((mask & (spread == 0)).sum())
        if t_hidden is not None:
            zeroed += int((mask & (t_hidden.abs().amax(-1) == 0)).sum())
    assert trained > 0
    assert uniform == 0 and zeroed == 0, (
        f"{uniform} of {trained} trained positions have a uniform teacher target ({zeroed} from zero hidden states)"
    )
    # score calls come in (teacher, student) pairs, one per micro-batch: the same ids, each scored in full
    assert len(spy.scores) == 2 * len(spy.losses)
    for (t_role, t_ids, t_lens, t), (s_role, s_ids, _, s) in zip(spy.scores[::2], spy.scores[1::2], strict=True):
        assert (t_role, s_role) == ("teacher", "student")
        assert t_ids == s_ids
        assert torch.equal(t.mask, s.mask)
        n = len(t_ids) // len(t_lens)
        for r, ids in enumerate(t_ids):
            assert int(t.mask[r].sum()) == len(ids) <= limit - t_lens[r // n]
    step = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert step["rollout/length"] > ROOM and step["rollout/cut_tokens"] > 0  # the rollouts were cut
    assert step["rollout/cut_tokens"] == pytest.approx(step["rollout/length"] - ROOM)


def test_fit_rollout_cuts_once_to_the_teacher_room_and_the_loss_masks_both_sides(hf_base, monkeypatch):
    """`fit_rollout` cuts each completion to the room of the longer context (the teacher's); and
    `distill_loss` given completions that were not fitted trains only where both sides scored."""
    backend = HFBackend.load(hf_base)
    samples = get_task("maze").generate(2, seed=0, split="train", sizes=(3, 3), cell_px=backend.cell_px)
    s_ctx = [backend.build_context(s, "student") for s in samples]
    t_ctx = teacher_contexts(backend, samples, samples, "data", torch.Generator().manual_seed(0))
    backend.options.max_length = max(len(c.ids) for c in t_ctx) + ROOM
    ids = [backend.encode_completion(s.text_only_completion())[:12] for s in samples for _ in range(2)]
    ro = Rollout(samples=samples, n=2, ids=ids, texts=[""] * 4, sampled=[[True] * len(i) for i in ids],
                 finished=[True] * 4, image_skips=[0] * 4)
    fitted = fit_rollout(backend, ro, s_ctx, t_ctx)
    for r, cut in enumerate(fitted.ids):
        room = backend.options.max_length - len(t_ctx[r // 2].ids)
        assert cut == ids[r][:room] and fitted.sampled[r] == [True] * len(cut) and len(cut) < len(ids[r])
    with torch.no_grad():
        t, s = backend.score(t_ctx, fitted.ids), backend.score(s_ctx, fitted.ids)
    assert torch.equal(t.mask, s.mask) and t.mask.sum() == sum(len(i) for i in fitted.ids)

    masks = []
    loss = train_module.generalized_jsd

    def spy(student, teacher, **kw):
        masks.append(kw["mask"])
        return loss(student, teacher, **kw)

    monkeypatch.setattr(train_module, "generalized_jsd", spy)
    teacher = Teacher(backend.model, "frozen")
    cfg = LossConfig()
    distill_loss(backend, teacher, s_ctx, t_ctx, ro, cfg, torch.tensor(4.0), {})  # not fitted: the teacher cut alone
    with torch.no_grad():
        t = backend.score(t_ctx, ro.ids)
    assert masks and not (masks[0] & ~t.mask).any()  # never a position the teacher did not score
    assert int(masks[0].sum()) == int(t.mask.sum())


def _decoder_logprobs(backend: HFBackend, ctx, ids: list[int]) -> torch.Tensor:
    """(T, V) log-probabilities the sampler uses for each token of `ids` after `ctx` (its KV decoder)."""
    backend.model.eval()
    with torch.no_grad():
        dec = backend.decoder([ctx])
        rows = []
        for token in ids:
            rows.append(dec.logits[0].log_softmax(-1))
            dec.step(torch.tensor([token]), torch.tensor([True]))
    return torch.stack(rows)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_student_is_scored_by_the_sampling_policy_without_dropout(hf_base, tmp_path, checkpointing):
    """A LoRA run with lora_dropout 0.5: after the run's set-up (`open_run`), the student's scores
    under gradients and in train mode (as `distill_backward` runs them) equal the sampler's
    log-probs and an eval-mode forward; two calls give identical scores and gradients (with gradient
    checkpointing too, whose recomputation in backward must see the same function)."""
    args = run_args(hf_base, tmp_path / "run", **{"backend.kind": "hf", "backend.lora": "true", "backend.lora_r": 4,
                                                  "backend.lora_dropout": 0.5,
                                                  "backend.gradient_checkpointing": str(checkpointing).lower()})
    run = open_run(load_config(TrainConfig, None, args))
    try:
        backend, model = run.backend, run.backend.model
        assert backend.options.lora_dropout == 0.5
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # LoRA's B starts at zero, where dropout on its input changes nothing
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        sample = run.train[0]
        ctx = backend.build_context(sample, "student")
        ids = backend.encode_completion(sample.text_only_completion())[:10]
        params = [p for p in model.parameters() if p.requires_grad]
        target = torch.tensor(ids)

        def scored() -> tuple[torch.Tensor, list[torch.Tensor]]:
            model.train()  # as distill_backward
            logp = backend.score([ctx], [ids]).logits[0].float().log_softmax(-1)
            assert logp.requires_grad and model.training
            grads = torch.autograd.grad(logp[torch.arange(len(ids)), target].sum(), params)
            return logp.detach(), list(grads)

        (a, grads_a), (b, grads_b) = scored(), scored()
        assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(grads_a, grads_b, strict=True))
        model.eval()
        with torch.no_grad():
            reference = backend.score([ctx], [ids]).logits[0].float().log_softmax(-1)
        torch.testing.assert_close(a, reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(a, _decoder_logprobs(backend, ctx, ids), rtol=0, atol=1e-4)
        assert unwrap(model).model.language_model.gradient_checkpointing is checkpointing  # still as configured
    finally:
        run.close(clean=True)


def test_disable_dropout_reaches_every_dropout_of_the_model():
    backend = HFBackend.tiny("llava", HFOptions(lora=True, lora_r=4, lora_dropout=0.3))
    dropouts = [m for m in backend.model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    assert dropouts and all(m.p == 0.3 for m in dropouts)  # LoRA's
    backend.disable_dropout()
    assert all(m.p == 0.0 for m in dropouts)
    rates = [getattr(m, k) for m in backend.model.modules() for k in ("attention_dropout", "dropout")
             if isinstance(getattr(m, k, None), float)]
    assert rates and all(r == 0.0 for r in rates)
