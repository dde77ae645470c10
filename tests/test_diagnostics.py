"""Diagnostics on tiny mini models: the KL is the defined quantity (same ids on both sides, exact zero
for identical contexts, reverse KL for swapped ones, the formula by hand), attention fractions are
fractions over the right spans, the five interventions with intervals, and the command end to end.

A random tiny model never asks for an image, so `scripted` plants a behaviour in its weights: after
the question's last token it writes `</think>`, then `<image_start>` (a VT is generated), then after
`<image_end>` it answers `R` and stops (or, with `answer=False`, goes on with random greedy text).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import maze_tokenizer, tiny_mini

from visual_opsd.backends.base import Interleaved
from visual_opsd.backends.mini import MiniBackend
from visual_opsd.cli import main
from visual_opsd.diagnostics import (
    INTERVENTION_MODES,
    attention_fractions,
    contexts_for,
    interventions,
    kl_diagnostic,
    kl_sanity,
    report_fields,
    span_fraction,
    student_completions,
    token_kl,
    trace_fractions,
)
from visual_opsd.diagnostics.attention import split_trace, trace_spans
from visual_opsd.diagnostics.run import post_models
from visual_opsd.losses import generalized_jsd
from visual_opsd.tasks import get_task

TOKENIZER = maze_tokenizer()
pytestmark = pytest.mark.usefixtures("one_thread")


def scripted(answer: bool = True, seed: int = 0, strength: float = 20.0, layer_scale: float = 1.0) -> MiniBackend:
    """A tiny model whose greedy output is `</think><image_start>[VT]<image_end>R<eos>` (see the module
    docstring): token a's embedding is 10 e_k and the next token's output row `strength` e_k (20: the
    script's token gets probability 1 in float32). `layer_scale` multiplies the transformer layers'
    weights, so that the context, hence C_T vs C_S, changes the predictions well above float32 noise."""
    b = tiny_mini(seed)
    with torch.no_grad():
        for name, p in b.model.layers.named_parameters():
            if "norm" not in name:
                p.mul_(layer_scale)
    tok = b.tokenizer
    last = int(b.build_context(SAMPLES[0]).row.ids[-1])  # the question's last token (" .")
    chain = [last, tok.id_of("</think>"), b.image_start_id]
    if answer:
        chain += [b.image_end_id, tok.id_of("R"), tok.eos_id]
    with torch.no_grad():
        for k, (a, nxt) in enumerate(zip(chain[:-1], chain[1:], strict=True)):
            e = torch.zeros(b.cfg.d_model)
            e[k] = 1.0
            b.model.tok_emb.weight[a] = 10 * e
            b.model.lm_head.weight[nxt] = strength * e
    return b


SAMPLES = get_task("maze").generate(6, seed=0, split="test", sizes=(3, 4), cell_px=4)


# ---------------------------------------------------------------------------------------------
# attention


def test_span_fraction_on_a_hand_built_layer():
    # 2 heads, 4 positions, causal rows that sum to 1
    a = torch.zeros(2, 4, 4)
    a[0, 2, :3] = torch.tensor([0.5, 0.25, 0.25])
    a[0, 3] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    for q in range(4):
        a[1, q, : q + 1] = 1.0 / (q + 1)
    queries, keys = torch.tensor([2, 3]), torch.tensor([0, 1])
    expected = ((0.5 + 0.25) + (0.1 + 0.2) + (2 / 3) + (2 / 4)) / 4  # mean over 2 heads x 2 queries
    assert span_fraction(a, queries, keys) == pytest.approx(expected)
    assert span_fraction(a, queries, torch.arange(4)) == pytest.approx(1.0)  # all keys: the whole mass
    assert math.isnan(span_fraction(a, torch.tensor([], dtype=torch.long), keys))


def test_trace_context_replays_the_generation_and_names_the_spans():
    b = scripted(answer=False)  # random greedy text after the VT: depends on every position before it
    ctx = [b.build_context(s) for s in SAMPLES[:2]]
    traces = b.generate_interleaved(ctx, max_new_tokens=14, vt_steps=3, max_images=1)
    for s, trace in zip(SAMPLES[:2], traces, strict=True):
        assert len(trace.images) == 1
        cut = split_trace(trace.ids, 1, b.image_start_id, b.image_end_id)
        assert trace.ids[cut - 1] == b.image_end_id and trace.ids[:2] == [TOKENIZER.id_of("</think>"), b.image_start_id]
        context = b.build_trace_context(s, trace.ids[:cut], trace.images)
        completion = trace.ids[cut:]
        scores = b.score([context], [completion], output_attentions=True)
        # greedy decoding chose the argmax (except the <image_end> injected after an over-budget
        # <image_start>): the trace context is the very sequence the model generated from
        chosen = [j for j in range(len(completion)) if j == 0 or completion[j - 1] != b.image_start_id]
        assert len(chosen) >= 5
        assert [int(scores.logits[0, j].argmax()) for j in chosen] == [completion[j] for j in chosen]
        cells = s.metadata["size"] ** 2
        (vt,) = context.spans("vt_image")
        (image,) = context.spans("problem_image")
        assert vt[1] - vt[0] == cells and image[1] - image[0] == cells
        spans = trace_spans(b, context, completion)
        n_ctx = context.num_tokens
        assert spans["text_before_vt"].tolist() == [vt[0] - 2]  # "</think>", then the <image_start> marker
        markers = (b.image_start_id, b.image_end_id)
        after = [n_ctx + j for j, i in enumerate(completion) if i not in markers]
        assert spans["text_after_vt"].tolist() == after
        # markers are not text: a completion with an (over-budget) image round in it
        with_markers = completion[:2] + [b.image_start_id, b.image_end_id] + completion[2:]
        marked = trace_spans(b, context, with_markers)["text_after_vt"].tolist()
        assert marked == [n_ctx + j for j, i in enumerate(with_markers) if i not in markers]
        assert len(marked) == len(after)  # the two inserted markers are the ones left out
        assert spans["vt"].tolist() == list(range(*vt)) and spans["input_image"].tolist() == list(range(*image))
        for layer in scores.attentions[0]:  # (H, S, S): every query's distribution over keys sums to 1
            assert torch.allclose(layer.sum(-1), torch.ones(layer.shape[:2]), atol=1e-5)
            assert span_fraction(layer, spans["text_after_vt"], torch.arange(layer.shape[-1])) == pytest.approx(1)


def test_trace_fractions_are_fractions():
    b = scripted()
    (trace,) = b.generate_interleaved([b.build_context(SAMPLES[0])], max_new_tokens=10, vt_steps=2)
    assert b.decode(trace.ids) == "</think><image_start><image_end>R"
    fractions = trace_fractions(b, SAMPLES[0], trace)
    assert set(fractions) == {"text_before_vt->input_image", "text_after_vt->vt", "text_after_vt->input_image"}
    for values in fractions.values():
        assert len(values) == b.cfg.n_layers and all(0.0 <= v <= 1.0 for v in values)
    total = [
        a + c for a, c in zip(fractions["text_after_vt->vt"], fractions["text_after_vt->input_image"], strict=True)
    ]
    assert all(t <= 1.0 + 1e-6 for t in total)  # disjoint key spans share one distribution
    no_vt = Interleaved(text="R", ids=[TOKENIZER.id_of("R"), TOKENIZER.eos_id], images=[], finished=True)
    assert trace_fractions(b, SAMPLES[0], no_vt) is None


def test_attention_fractions_report_every_layer_span_and_kind():
    b = scripted()
    records: list[dict] = []
    m = attention_fractions(b, SAMPLES[:4], vt_steps=2, max_new_tokens=10, records=records)
    assert m["attention/n_layers"] == 2 and m["attention/generated/no_vt"] == 0 and m["attention/noise/no_vt"] == 0
    for kind in ("generated", "noise"):
        for span in ("text_before_vt->input_image", "text_after_vt->vt", "text_after_vt->input_image"):
            for layer in range(2):
                key = f"attention/{kind}/{span}/layer_{layer:02d}"
                assert 0.0 <= m[f"{key}/mean"] <= 1.0 and m[f"{key}/n"] == 4 and m[f"{key}/std"] >= 0
    assert len(records) == 8 and m["time/attention_s"] > 0


# ---------------------------------------------------------------------------------------------
# interventions


def test_interventions_give_five_modes_with_intervals():
    b = scripted()
    records: list[dict] = []
    m = interventions(b, SAMPLES, vt_steps=2, max_new_tokens=10, batch_size=4, records=records)
    for mode in INTERVENTION_MODES:
        key = f"interventions/maze/{mode}"
        assert m[f"{key}/n"] == len(SAMPLES)
        assert 0.0 <= m[f"{key}/ci95_lo"] <= m[f"{key}/accuracy"] <= m[f"{key}/ci95_hi"] <= 100.0
        assert m[f"{key}/accuracy"] == pytest.approx(100.0 * m[f"{key}/correct"] / len(SAMPLES))
        assert m[f"{key}/vts"] == (0.0 if mode == "text_only" else 1.0)
    assert m["interventions/maze/interleaved/ci95_hi"] > 0  # 0 of 6 correct still has an upper bound
    assert all(m[f"interventions/{mode}/fallback_images"] == 0 for mode in ("noise", "shuffled", "oracle"))
    shuffled = [r for r in records if r["mode"] == "shuffled"]
    assert len(shuffled) == len(SAMPLES) and all(r["vt_from"] != r["id"] for r in shuffled)
    text_only = [r for r in records if r["mode"] == "text_only"]
    assert all(r["prediction"] == "</think><image_start><image_end>R" for r in text_only)  # image skip


def test_noise_and_shuffled_insert_the_right_images(monkeypatch):
    b = scripted()
    calls: list = []
    real = MiniBackend.generate_interleaved

    def spy(self, contexts, **kw):
        out = real(self, contexts, **kw)
        calls.append((kw.get("given_vts"), out))
        return out

    monkeypatch.setattr(MiniBackend, "generate_interleaved", spy)
    interventions(b, SAMPLES[:4], modes=["noise", "shuffled", "oracle"], vt_steps=2, max_new_tokens=10)
    (none, generated), (noise, _), (shuffled, _), (oracle, _) = calls
    assert none is None
    for g, n in zip(generated, noise, strict=True):
        assert n[0].size == g.images[0].size  # same shape as the generated VT
        px = torch.tensor(list(n[0].get_flattened_data()), dtype=torch.float) / 127.5 - 1  # (pixels, 3) in [-1, 1]
        assert abs(float(px.mean())) < 0.15 and 0.6 < float(px.std()) < 0.9  # clamped N(0, 1)
    own = [list(g.images[0].get_flattened_data()) for g in generated]
    for i, given in enumerate(shuffled):  # the VT generated for another sample
        assert any(list(given[0].get_flattened_data()) == own[j] for j in range(len(own)) if j != i)
    assert [o[0] for o in oracle] == [s.vt_images[0] for s in SAMPLES[:4]]


def test_interventions_reject_unknown_modes():
    with pytest.raises(ValueError, match="unknown intervention modes"):
        interventions(tiny_mini(), SAMPLES[:1], modes=["interleaved", "dream"])


# ---------------------------------------------------------------------------------------------
# kl


def test_kl_scores_the_same_ids_on_both_sides(monkeypatch):
    b = tiny_mini()
    seen: list = []
    real = MiniBackend.score

    def spy(self, contexts, completions, **kw):
        seen.append(([c.role for c in contexts], completions))
        return real(self, contexts, completions, **kw)

    monkeypatch.setattr(MiniBackend, "score", spy)
    kl_diagnostic(b, SAMPLES[:3], max_new_tokens=8, batch_size=2)
    assert len(seen) == 8  # two sources (data, student) x two batches, teacher then student
    for (t_roles, t_ids), (s_roles, s_ids) in zip(seen[::2], seen[1::2], strict=True):
        assert set(t_roles) == {"teacher"} and set(s_roles) == {"student"}
        assert t_ids is s_ids  # the very same id lists, never re-tokenised


def test_injected_ids_are_not_scored():
    comps = student_completions(scripted(), SAMPLES[:2], "student", max_new_tokens=10, seed=0)
    assert comps.ids[0][:3] == [
        TOKENIZER.id_of("</think>"),
        TOKENIZER.id_of("<image_start>"),
        TOKENIZER.id_of("<image_end>"),
    ]
    assert comps.scored == [[True, True, False, True, True]] * 2  # the image skip's <image_end> is injected


def test_kl_is_the_defined_quantity(monkeypatch):
    """K by hand: per token sum_v p_T (log p_T - log p_S), mean over the scored tokens, mean over samples."""
    b = scripted(strength=2.0, layer_scale=10.0)  # the contexts matter: K well above round-off
    samples = SAMPLES[:3]
    comps = student_completions(b, samples, "student", max_new_tokens=10, seed=5)
    comps.scored = [[j % 3 != 1 for j in range(len(ids))] for ids in comps.ids]  # leave some ids out
    monkeypatch.setattr("visual_opsd.diagnostics.kl.student_completions", lambda *a, **k: comps)
    records: list[dict] = []
    m = kl_diagnostic(b, samples, sources=["student"], max_new_tokens=10, records=records, seed=5)
    assert [r["ids"] for r in records] == comps.ids and {r["measure"] for r in records} == {"student/pre"}
    t_ctx, s_ctx = contexts_for(b, samples)
    per_sample = []
    with torch.no_grad():
        t = b.score(t_ctx, comps.ids).logits.double().log_softmax(-1)
        s = b.score(s_ctx, comps.ids).logits.double().log_softmax(-1)
    for r, flags in enumerate(comps.scored):
        kl = (t[r].exp() * (t[r] - s[r])).sum(-1)[: len(flags)]
        per_sample.append(float(kl[torch.tensor(flags)].mean()))
    assert m["kl/student/pre/maze/mean"] == pytest.approx(sum(per_sample) / 3, rel=1e-4)
    assert m["kl/student/pre/maze/n"] == 3 and m["kl/student/pre/maze/tokens"] == sum(map(sum, comps.scored))
    assert m["kl/student/pre/maze/mean"] > 1e-3  # far above float32 round-off
    assert not any(k.startswith("kl/data/") for k in m)  # only the sources asked for


def test_kl_sanity_identical_is_exactly_zero_and_swapped_is_the_reverse():
    b = tiny_mini()
    t_ctx, s_ctx = contexts_for(b, SAMPLES[:3])
    comps = student_completions(b, SAMPLES[:3], "data")
    identical = token_kl(b, s_ctx, s_ctx, comps.ids)
    assert all(bool((x == 0).all()) for x in identical)
    swapped = token_kl(b, s_ctx, t_ctx, comps.ids)  # teacher side C_S, student side C_T
    with torch.no_grad():  # the reverse KL(p(.|C_S) || p(.|C_T)), independently, with beta = 1
        t, s = b.score(t_ctx, comps.ids), b.score(s_ctx, comps.ids)
    reverse = generalized_jsd(s.logits, t.logits, beta=1.0, mask=s.mask, reduction="none")
    for r, x in enumerate(swapped):
        assert torch.allclose(x, reverse[r, : len(x)], rtol=1e-5, atol=1e-7)
    assert max(float(x.max()) for x in swapped) > 0
    out = kl_sanity(b, SAMPLES[:3], source="data")
    assert out["kl/sanity/passed"] == 1.0 and out["kl/sanity/identical/max_abs"] == 0.0


def test_gap_closure_per_teacher_side():
    base, trained = tiny_mini(0), tiny_mini(0)
    with torch.no_grad():
        for p in trained.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m = kl_diagnostic(base, SAMPLES[:3], post={"same": tiny_mini(0), "trained": trained}, sources="data")
    pre = m["kl/data/pre/maze/mean"]
    for side in ("base", "self"):  # identical weights: K_post = K_pre on the same data tokens
        assert m[f"kl/data/post/same/teacher={side}/maze/mean"] == pytest.approx(pre, rel=1e-6)
        assert m[f"kl/data/closure/same/teacher={side}/maze"] == pytest.approx(0.0, abs=1e-6)
        k_post = m[f"kl/data/post/trained/teacher={side}/maze/mean"]
        assert m[f"kl/data/closure/trained/teacher={side}/maze"] == pytest.approx(1 - k_post / pre)
    assert m["kl/data/post/trained/teacher=base/maze/mean"] != m["kl/data/post/trained/teacher=self/maze/mean"]


def _trained(seed: int = 0, scale: float = 0.05) -> MiniBackend:
    """tiny_mini(0) with its weights moved a little: a stand-in for a distilled checkpoint."""
    b = tiny_mini(0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in b.model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return b


def test_both_sources_in_one_run_and_the_data_closure_is_on_identical_tokens():
    """Default sources: data (headline) then student, each with K_pre, K_post per teacher side and the
    closure. Under `data` K_pre and every K_post score the very same ids (the data's traces); under
    `student` the trained model's own samples differ from the base model's."""
    base, trained = tiny_mini(0), _trained()
    records: list[dict] = []
    m = kl_diagnostic(base, SAMPLES[:3], post={"opsd": trained}, max_new_tokens=8, records=records, seed=1)
    assert m["kl/data/order"] == 0.0 and m["kl/student/order"] == 1.0
    by_measure: dict[str, list] = {}
    for r in records:
        by_measure.setdefault(r["measure"], []).append(r["ids"])
        assert r["source"] == r["measure"].split("/")[0]
    assert set(by_measure) == {
        f"{src}/{m_}" for src in ("data", "student") for m_ in ("pre", "opsd/teacher=base", "opsd/teacher=self")
    }
    traces = [base.encode_completion(s.text_only_completion()) for s in SAMPLES[:3]]
    for measure in ("data/pre", "data/opsd/teacher=base", "data/opsd/teacher=self"):
        assert by_measure[measure] == traces  # identical token ids before and after
    assert m["kl/data/same_tokens"] == 1.0
    assert by_measure["student/pre"] != by_measure["student/opsd/teacher=base"]  # different samples
    assert by_measure["student/opsd/teacher=base"] == by_measure["student/opsd/teacher=self"]
    assert m["kl/student/same_tokens"] == 0.0
    for src in ("data", "student"):
        pre = m[f"kl/{src}/pre/maze/mean"]
        assert pre > 0
        for side in ("base", "self"):
            k_post = m[f"kl/{src}/post/opsd/teacher={side}/maze/mean"]
            assert m[f"kl/{src}/closure/opsd/teacher={side}/maze"] == pytest.approx(1 - k_post / pre)
    # the data measurement is the same whatever else is measured beside it
    alone = kl_diagnostic(base, SAMPLES[:3], post={"opsd": trained}, sources=["data"], seed=1)
    assert alone["kl/data/closure/opsd/teacher=base/maze"] == m["kl/data/closure/opsd/teacher=base/maze"]


def test_report_fields_give_both_closures_with_their_teacher_side():
    base, trained = tiny_mini(0), _trained()
    m = kl_diagnostic(base, SAMPLES[:3], post={"opsd": trained}, max_new_tokens=8, seed=1)
    kl = report_fields({"kl": m})["kl"]
    assert kl["headline"] == "closure"
    for key, src in (("closure", "data"), ("closure_student_samples", "student")):
        entry = kl[key]
        assert entry["completions"] == src and entry["teacher_side"] == "base"
        assert entry["k_pre"] == m[f"kl/{src}/pre/maze/mean"]
        assert entry["k_post"] == {"opsd": m[f"kl/{src}/post/opsd/teacher=base/maze/mean"]}
        assert entry["per_model"] == {"opsd": m[f"kl/{src}/closure/opsd/teacher=base/maze"]}
    assert kl["closure"]["same_tokens"] is True and kl["closure_student_samples"]["same_tokens"] is False
    assert kl["closure"]["per_model"] != kl["closure_student_samples"]["per_model"]
    self_side = report_fields({"kl": m}, teacher_side="self")["kl"]["closure"]
    assert self_side["teacher_side"] == "self"
    assert self_side["per_model"] == {"opsd": m["kl/data/closure/opsd/teacher=self/maze"]}
    with pytest.raises(ValueError, match="teacher_side"):
        report_fields({"kl": m}, teacher_side="teacher")
    # the student samples as the headline: kl.closure still holds the identical-token figures
    flipped = kl_diagnostic(
        base, SAMPLES[:3], post={"opsd": trained}, sources=["student", "data"], max_new_tokens=8, seed=1
    )
    kl2 = report_fields({"kl": flipped})["kl"]
    assert kl2["headline"] == "closure_student_samples" and kl2["closure"]["completions"] == "data"
    assert kl2["closure"]["per_model"] == kl["closure"]["per_model"]
    # one source measured: only its entry
    only = report_fields({"kl": kl_diagnostic(base, SAMPLES[:3], post={"opsd": trained}, sources="data")})["kl"]
    assert set(only) == {"headline", "closure"}
    assert report_fields({})["kl"] == {}


def test_report_md_shows_both_closures_headline_first(tmp_path):
    from visual_opsd.report import write_report

    base, trained = tiny_mini(0), _trained()
    for sources in (["data", "student"], ["student", "data"]):
        m = kl_diagnostic(base, SAMPLES[:3], post={"opsd": trained}, sources=sources, max_new_tokens=8, seed=1)
        kl = report_fields({"kl": m})["kl"]
        system = {
            "accuracy": 50.0,
            "latency_s": 0.1,
            "tokens": 10,
            "tasks": {"maze": {"accuracy": 50.0, "ci95": [30.0, 70.0], "n": 4, "latency_s": 0.1, "tokens": 10}},
        }
        md = write_report({"systems": {"opsd": system}, "kl": kl}, tmp_path / sources[0], {}).read_text()
        identical, samples = md.index("Closure on identical tokens"), md.index("Closure on student samples")
        assert (identical < samples) == (sources[0] == "data")
        assert "(`kl.closure`, headline)" in md if sources[0] == "data" else "(`kl.closure`, beside it)" in md
        assert md.count("Teacher side: the frozen base model (the SFT teacher) with the data's VTs") == 2
        for entry in (kl["closure"], kl["closure_student_samples"]):
            assert f"| opsd | {entry['k_post']['opsd']:.4f} | {100 * entry['per_model']['opsd']:.1f}% |" in md


def test_an_invalid_completion_source_is_a_clear_error():
    from visual_opsd.config import load_config
    from visual_opsd.diagnostics.run import DiagnoseConfig
    from visual_opsd.errors import ConfigError

    with pytest.raises(ValueError, match=r"unknown completion source 'pixels'; choose from \['data', 'student'\]"):
        kl_diagnostic(tiny_mini(), SAMPLES[:2], sources=["data", "pixels"])
    with pytest.raises(ValueError, match="no completion source"):
        kl_diagnostic(tiny_mini(), SAMPLES[:2], sources=[])
    with pytest.raises(ValueError, match="repeat"):
        kl_diagnostic(tiny_mini(), SAMPLES[:2], sources=["data", "data"])
    for bad in ("[pixels]", "[]", "[data,data]", "data"):
        with pytest.raises(ConfigError, match="kl"):
            load_config(DiagnoseConfig, None, [f"kl.sources={bad}"])
    assert load_config(DiagnoseConfig, None, []).kl.sources == ["data", "student"]
    with pytest.raises(ConfigError, match="kl.sources"):  # the old key points to the new one
        load_config(DiagnoseConfig, None, ["kl.source=data"])


def test_post_model_names():
    assert post_models(["runs/opsd/best/model", "noise=runs/opsd_noise/best", "x/opsd/last"]) == {
        "opsd": "runs/opsd/best/model",
        "noise": "runs/opsd_noise/best",
        "opsd_2": "x/opsd/last",
    }


# ---------------------------------------------------------------------------------------------
# command line


def test_diagnose_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["diagnose", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "{interventions,attention,kl,all}" in out and "--post" in out
    assert "kl.sources" in out


def test_diagnose_typo_is_a_config_error(capsys):
    assert main(["diagnose", "kll", "--model", "x", "--print-config"]) == 2
    assert "did you mean 'kl'?" in capsys.readouterr().err


@pytest.mark.slow  # the whole `diagnose all` pipeline (interventions, attention, KL) on two models
def test_diagnose_all_end_to_end(tmp_path, capsys):
    model, post = tmp_path / "teacher", tmp_path / "opsd" / "best" / "model"
    scripted().save(model)
    scripted(seed=1).save(post)
    out = tmp_path / "diag"
    argv = [
        "diagnose",
        "all",
        "--model",
        str(model),
        "--post",
        str(tmp_path / "opsd" / "best"),
        f"out_dir={out}",
        "progress=false",
        "threads=1",
        "data.n=4",
        "data.sizes=[3,4]",
        "interventions.vt_steps=2",
        "interventions.max_new_tokens=10",
        "attention.vt_steps=2",
        "attention.max_new_tokens=10",
        "kl.max_new_tokens=10",
    ]
    assert main(argv) == 0
    for what in ("interventions", "attention", "kl"):
        for ext in ("json", "md", "png"):
            assert (out / f"{what}.{ext}").stat().st_size > 0
    assert (out / "kl_tokens.html").read_text().count("nats'") > 0
    kl = json.loads((out / "kl.json").read_text())
    assert kl["metrics"]["kl/sanity/passed"] == 1.0
    for src in ("data", "student"):  # both sources in one run, the data's traces first
        assert f"kl/{src}/closure/opsd/teacher=base/maze" in kl["metrics"]
    assert "KL( p_T(. | C_T, y<t) || p_S(. | C_S, y<t) )" in kl["definition"]
    md = (out / "kl.md").read_text()
    assert "| K_post opsd | base + VTs (C_T) | opsd (C_S) |" in md
    assert "| K_post opsd | opsd + VTs (C_T) | opsd (C_S) |" in md
    assert md.index("## Completions: data (headline)") < md.index("## Completions: student (beside the headline)")
    assert "sum_{k in K} A_l[h, q, k]" in (out / "attention.md").read_text()
    inter = json.loads((out / "interventions.json").read_text())["metrics"]
    assert {k.split("/")[2] for k in inter if k.endswith("/accuracy")} == set(INTERVENTION_MODES)
    assert "diagnose kl:" in capsys.readouterr().out
    fields = report_fields({"interventions": inter, "kl": kl["metrics"]}, teacher_side="self")
    assert set(fields["interventions"]) == set(INTERVENTION_MODES)
    assert fields["kl"]["headline"] == "closure"
    assert fields["kl"]["closure"]["k_pre"] == kl["metrics"]["kl/data/pre/maze/mean"]
    assert fields["kl"]["closure"]["per_model"] == {"opsd": kl["metrics"]["kl/data/closure/opsd/teacher=self/maze"]}
    assert fields["kl"]["closure_student_samples"]["per_model"] == {
        "opsd": kl["metrics"]["kl/student/closure/opsd/teacher=self/maze"]
    }
