"""The backend interface and the built-in mini unified model, on a very small config (seconds).

Checks: tokenizer round trip; VT picking per vt_mode; image-skip injection (generic, on a scripted
decoder); contexts and segments; attention masks (causal text, bidirectional image blocks, GEN
blocks hidden); cache equivalence (decoded logits == full forward); prefix reuse; the explicit
attention path; save/load round trip without pickle; interleaved generation feeds back exactly the
image it returns; SFT rows (labels on completion text only, the noised VT copy is invisible).
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from visual_opsd.backends.base import Decoder, sample_with_image_skip
from visual_opsd.backends.mini import (
    DEFAULT_FRAMING,
    DEFAULT_TRANSITION,
    IGNORE,
    MiniBackend,
    Row,
    collate,
    fit_image,
    patchify,
    text_tokens,
    to_pixels,
    unpatchify,
)
from visual_opsd.backends.mini_model import GEN, PAD, TEXT, UND, MiniUMM, Tokens, attention_mask
from visual_opsd.sample import MARKERS, THINK_START, Sample
from visual_opsd.tokenizer import Tokenizer, build_tokenizer, sample_texts
from visual_opsd.vt import NoiseVT, pick_vt_images

torch.set_num_threads(1)


def _image(rng: np.random.Generator, cells: int, px: int = 4) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (cells * px, cells * px, 3), dtype=np.uint8), "RGB")


def _samples() -> list[Sample]:
    rng = np.random.default_rng(0)
    out = []
    for i, cells in enumerate((3, 4, 3)):
        out.append(
            Sample(
                id=f"s{i}",
                task="maze",
                question=f"Find a path in the {cells} x {cells} lake .",
                answer="R,D",
                problem_images=[_image(rng, cells)],
                vt_images=[_image(rng, cells)],
                thoughts=["The elf is at ( 0 , 0 ) .", "Reading the path : R , D ."],
                text_only_trace="Step 1 : R . Step 2 : D .",
            )
        )
    return out


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return _samples()


@pytest.fixture(scope="module")
def backend(samples) -> MiniBackend:
    tok = build_tokenizer(list(sample_texts(samples)) + [DEFAULT_FRAMING, DEFAULT_TRANSITION])
    be = MiniBackend.new(tok, seed=0, d_model=32, n_layers=2, n_heads=2, mlp_ratio=2.0, patch_size=4, max_grid=6)
    be.model.eval()
    return be


def _completion(backend: MiniBackend, sample: Sample) -> list[int]:
    return backend.tokenizer.encode(sample.text_only_completion()) + [backend.eos_id]


# --- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_markers(backend, tmp_path):
    tok = backend.tokenizer
    for marker in MARKERS:
        assert len(tok.encode(marker)) == 1
    for text in ["<think>Go R , then D .</think><answer>\\boxed{R,D}</answer>", " unseen words 123\n x", "a  b"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.unk_id in tok.encode("é")
    tok.save(tmp_path / "t.json")
    assert Tokenizer.load(tmp_path / "t.json").vocab == tok.vocab


def test_location_tokens_are_one_token_and_old_vocabularies_spell_them_out(backend):
    tok = backend.tokenizer
    text = "The elf is at ( 2 , 3 ) and the gift at ( 0 , 0 ) ."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert [tok.vocab[i] for i in ids[4:5]] == [" ( 2 , 3 )"]
    assert len(tok.cell_tokens()) == 200 and (tok.id_of("( 4 , 5 )"), 4, 5) in tok.cell_tokens()
    old = Tokenizer([p for p in tok.vocab if "( " not in p or p.strip() == "("])  # a vocabulary from before them
    assert old.cell_tokens() == [] and old.decode(old.encode(text)) == text
    assert len(old.encode(text)) == len(ids) + 2 * 4  # each cell is 5 pieces there


def test_location_tokens_sit_at_their_cell(backend, samples):
    """A `( r , c )` token gets the 2-D position and row/column embedding of grid cell (r, c)."""
    tok, model = backend.tokenizer, backend.model
    ids = torch.tensor([[tok.id_of(" ( 2 , 3 )"), tok.id_of(" ."), tok.id_of("( 9 , 9 )")]])  # 9: off the 6-grid
    x = text_tokens(ids, torch.arange(3)[None], torch.ones(1, 3, dtype=torch.bool), model.cfg.patch_dim)
    rowcol, has_cell = model.cells(x)
    assert rowcol[0].tolist() == [[2, 3], [0, 0], [0, 0]] and has_cell[0].tolist() == [True, False, False]
    plain = MiniBackend(MiniUMM(replace(model.cfg, cell_tokens=[])), tok)
    plain.model.load_state_dict(model.state_dict(), strict=False)  # less the location-token head
    h, _ = model(x)
    h_plain, _ = plain.model(x)
    assert not torch.allclose(h[0, 0], h_plain[0, 0])  # the location token moved
    # ordinary text never does
    y = text_tokens(ids[:, 1:2], torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool),
                    model.cfg.patch_dim)
    assert torch.equal(model(y)[0], plain.model(y)[0])


# --- generic helpers -------------------------------------------------------------------------


def test_pick_vt_images_modes(samples):
    s, other = samples[0], samples[1]
    assert pick_vt_images(s, "data") == s.vt_images
    noise = pick_vt_images(s, "noise")
    assert noise == [NoiseVT(*s.vt_images[0].size)]
    assert pick_vt_images(s, "shuffled", shuffled_from=other) == other.vt_images
    assert pick_vt_images(s, "none") == []
    with pytest.raises(ValueError, match="shuffled_from"):
        pick_vt_images(s, "shuffled")
    with pytest.raises(ValueError, match="itself"):
        pick_vt_images(s, "shuffled", shuffled_from=s)
    with pytest.raises(ValueError, match="vt_mode"):
        pick_vt_images(s, "bogus")


class _ScriptedDecoder(Decoder):
    """Row b emits script[b][k] at its k-th step (whatever was fed); records what was fed."""

    def __init__(self, script: list[list[int]], vocab: int):
        self.script, self.vocab = script, vocab
        self.k = [0] * len(script)
        self.fed: list[list[int]] = [[] for _ in script]
        self._refresh()

    def _refresh(self) -> None:
        self.logits = torch.zeros(len(self.script), self.vocab)
        for b, k in enumerate(self.k):
            self.logits[b, self.script[b][min(k, len(self.script[b]) - 1)]] = 10.0

    def step(self, ids, active):
        for b in torch.nonzero(active).flatten().tolist():
            self.fed[b].append(int(ids[b]))
            self.k[b] += 1
        self._refresh()


def test_image_skip_injection(backend):
    tok = backend.tokenizer
    S, E, T, eos = backend.image_start_id, backend.image_end_id, tok.id_of(THINK_START), backend.eos_id
    x = tok.encode(" R")[0]
    # row 0: one image_start (skipped), then text to eos; row 1: a second image_start ends the row;
    # row 2: never finishes. The scripted token at each injected step (x after S) is overridden.
    script = [[x, S, x, T, x, eos], [S, x, x, S, x, x], [x] * 20]
    dec = _ScriptedDecoder(script, len(tok))
    out = sample_with_image_skip(backend, dec, max_new_tokens=8, temperature=0.0, max_image_skips=1)
    assert out[0].ids == [x, S, E, T, x, eos] and out[0].finished and out[0].image_skips == 1
    assert out[0].sampled == [True, True, False, True, True, True]
    assert dec.fed[0] == [x, S, E, T, x]  # the sampling cache saw the injected <image_end>
    assert out[1].ids == [S, E, x, S] and not out[1].finished and out[1].sampled == [True, False, True, True]
    assert len(out[2].ids) == 8 and not out[2].finished
    assert out[0].text == tok.decode([x, S, E, T, x])
    none = sample_with_image_skip(backend, _ScriptedDecoder(script, len(tok)), 8, 0.0, max_image_skips=0)
    assert none[0].ids == [x, S] and not none[0].finished


# --- contexts --------------------------------------------------------------------------------


def test_contexts_and_segments(backend, samples):
    s = samples[1]
    student = backend.build_context(s)
    teacher = backend.build_context(s, role="teacher")
    S = len(student.row)
    assert student.num_tokens == S and teacher.num_tokens == len(teacher.row)
    for name in ("kind", "ids", "pos", "rowcol"):  # the teacher context extends the student's
        assert torch.equal(getattr(teacher.row, name)[:S], getattr(student.row, name))
    kinds = [seg.kind for seg in teacher.segments]
    assert kinds == [
        "text",
        "marker",
        "problem_image",
        "marker",
        "text",
        "framing",
        "marker",
        "vt_image",
        "marker",
        "transition",
    ]
    ((a, b),) = teacher.spans("vt_image")
    assert b - a == 16 and bool((teacher.row.kind[a:b] == UND).all())  # a 4 x 4 patch grid
    assert student.grid == (4, 4) and teacher.next_pos == len(teacher.row)
    none = backend.build_context(s, role="teacher", vt_mode="none")
    assert none.spans("vt_image") == [] and none.spans("framing")
    g = torch.Generator().manual_seed(0)
    n1 = backend.build_context(s, role="teacher", vt_mode="noise", generator=g)
    n2 = backend.build_context(s, role="teacher", vt_mode="noise", generator=g)
    assert not torch.equal(n1.row.patches, n2.row.patches)  # redrawn on every call
    assert abs(float(n1.row.patches[16:].std()) - 1.0) < 0.2  # N(0, 1) in the normalised space
    shuffled = backend.build_context(s, role="teacher", vt_mode="shuffled", shuffled_from=samples[0])
    assert len(shuffled.spans("vt_image")[0]) == 2 and shuffled.num_tokens != teacher.num_tokens


def test_images_fit_and_patchify_round_trip():
    rng = np.random.default_rng(1)
    big = _image(rng, 6, px=64)  # a 64 px-per-cell render shrinks to one patch per cell
    assert fit_image(big, 4, 8).size == (24, 24)
    # any other image (a benchmark's photo) is resized to whole patches, aspect kept, within max_grid
    assert fit_image(Image.new("RGB", (10, 12)), 4, 8).size == (8, 12)
    assert fit_image(Image.new("RGB", (640, 480)), 4, 8).size == (32, 24)
    assert fit_image(Image.new("RGB", (900, 30)), 4, 8).size == (32, 4)  # at least one patch a side
    px = to_pixels(_image(rng, 3))
    assert px.shape == (3, 12, 12) and px.min() >= -1 and px.max() <= 1
    patches = patchify(px, 4)
    assert patches.shape == (9, 48)
    assert torch.equal(unpatchify(patches, (3, 3), 4), px)
    # patch 1 is row 0, column 1: pixels [0:4, 4:8], flattened channel-first
    assert torch.equal(patches[1], px[:, 0:4, 4:8].reshape(-1))


# --- masks -----------------------------------------------------------------------------------


def _toy_tokens() -> Tokens:
    # text text | UND UND UND (block 0) | text | GEN GEN (block 1) | UND UND (block 2) | text
    kind = torch.tensor([[TEXT, TEXT, UND, UND, UND, TEXT, GEN, GEN, UND, UND, TEXT]])
    block = torch.tensor([[-1, -1, 0, 0, 0, -1, 1, 1, 2, 2, -1]])
    T = kind.shape[1]
    return Tokens(
        kind=kind,
        ids=torch.zeros(1, T, dtype=torch.long),
        patches=torch.zeros(1, T, 48),
        rowcol=torch.zeros(1, T, 2, dtype=torch.long),
        t=torch.zeros(1, T),
        block=block,
        pos=torch.arange(T)[None],
    )


def test_attention_mask_rules():
    m = attention_mask(_toy_tokens())[0]  # (T, T): query row, key column
    T = m.shape[0]
    for i in range(T):
        for j in range(T):
            if j > i:
                # later items are visible only inside one image block
                expect = (i, j) in {(2, 3), (2, 4), (3, 4), (6, 7), (8, 9)}
                assert bool(m[i, j]) == expect, (i, j)
    assert not m[8:, 6:8].any()  # nothing after a GEN block sees it ...
    assert m[6:8, :6].all() and m[6:8, 6:8].all()  # ... which sees everything before it and itself
    assert m[5, :5].all()


def test_attention_is_causal_and_blocks_are_bidirectional(backend, samples):
    """Functional check on the network: perturbing an item changes exactly what the mask allows."""
    model = backend.model
    row = backend.training_row(samples[0], "interleaved", torch.Generator().manual_seed(0)).row
    x = collate([row], model.cfg.patch_dim, left_pad=False)
    base, _ = model(x)
    kind = x.kind[0]
    und_blocks = [int(b) for b in x.block[0][kind == UND].unique()]
    vt_block = und_blocks[-1]
    vt_items = torch.nonzero(x.block[0] == vt_block).flatten()
    first, last = int(vt_items[0]), int(vt_items[-1])
    # 1) change the last patch of the clean VT: earlier patches of its block change, nothing before it
    y = collate([row], model.cfg.patch_dim, left_pad=False)
    y.patches[0, last] += 1.0
    out, _ = model(y)
    assert torch.allclose(out[0, :first], base[0, :first], atol=1e-6)
    assert not torch.allclose(out[0, first], base[0, first], atol=1e-4)
    # 2) change a late text token: no earlier position changes
    j = len(row) - 3
    y = collate([row], model.cfg.patch_dim, left_pad=False)
    y.ids[0, j] = (y.ids[0, j] + 1) % model.cfg.vocab_size
    out, _ = model(y)
    assert torch.allclose(out[0, :j], base[0, :j], atol=1e-6)
    # 3) change the noised GEN copy: no non-GEN item anywhere changes
    y = collate([row], model.cfg.patch_dim, left_pad=False)
    y.patches[0, kind == GEN] += 1.0
    out, _ = model(y)
    assert torch.allclose(out[0, kind != GEN], base[0, kind != GEN], atol=1e-6)


def test_training_row_without_gen_copy_matches_inference_layout(backend, samples):
    """The SFT trick (noised copy in the same forward) leaves every other hidden state as in a row
    without the copy: what the text after a VT sees during SFT is what it sees at inference."""
    model = backend.model
    row, labels, flow, _ = backend.training_row(samples[0], "interleaved", torch.Generator().manual_seed(0))
    keep = row.kind != GEN
    img = (row.kind == UND) | (row.kind == GEN)
    stripped = Row(
        kind=row.kind[keep],
        ids=row.ids[keep],
        rowcol=row.rowcol[keep],
        t=row.t[keep],
        block=row.block[keep],
        pos=row.pos[keep],
        patches=row.patches[~(row.kind[img] == GEN)],
    )
    a, _ = model(collate([row], model.cfg.patch_dim, False))
    b, _ = model(collate([stripped], model.cfg.patch_dim, False))
    assert torch.allclose(a[0, keep], b[0], atol=1e-5)
    assert torch.equal(row.pos[keep], torch.arange(int(keep.sum())))  # GEN copy shares positions
    assert flow.shape == (int((row.kind == GEN).sum()), model.cfg.patch_dim)


def test_sft_losses_with_a_shared_prefix_equal_the_plain_forward(backend, samples):
    """Rows that open with the same text (then an image and their own text): the shared-prefix path
    gives the same losses and gradients as the plain forward."""
    from visual_opsd.backends.mini import IGNORE, RowBuilder, TrainingExample, _common_text_prefix, to_pixels

    tok = backend.tokenizer
    shared = [tok.bos_id, *tok.encode(samples[0].question)]
    examples = []
    for s in samples[:2]:
        b = RowBuilder(backend.cfg.patch_size, backend.cfg.patch_dim)
        b.text(shared)
        b.image(to_pixels(s.problem_images[0]))
        completion = tok.encode(s.text_only_completion()) + [tok.eos_id]
        b.text(completion)
        row = b.build()
        lab = torch.full((len(row),), IGNORE, dtype=torch.long)
        lab[-len(completion) - 1 : -1] = row.ids[-len(completion) :]  # position i predicts item i + 1
        examples.append(TrainingExample(row, lab, torch.zeros(0, backend.cfg.patch_dim), torch.zeros(0)))
    assert _common_text_prefix(collate([e.row for e in examples], backend.cfg.patch_dim, False)) == len(shared)
    results = []
    for share in (False, True):
        backend.model.zero_grad(set_to_none=True)
        out = backend.sft_losses(examples, share_prefix=share)
        (out["ce_sum"] + out["flow_sum"]).backward()
        grads = [p.grad.clone() for p in backend.model.parameters() if p.grad is not None]
        results.append((out, grads))
    backend.model.zero_grad(set_to_none=True)
    (a, ga), (b, gb) = results
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-4, atol=1e-4), key
    assert len(ga) == len(gb) and all(torch.allclose(x, y, atol=1e-5) for x, y in zip(ga, gb, strict=True))


def test_flow_copies_and_edit_weights(backend, samples):
    """Two noised copies per VT; patches where the VT differs from the problem image weigh more."""
    s = samples[0]
    vt = np.asarray(s.problem_images[0]).copy()
    vt[0:4, 4:8] = (220, 30, 30)  # the path crosses cell (0, 1) only
    edited = Sample(**{**s.__dict__, "vt_images": [Image.fromarray(vt)]})
    ex = backend.training_row(edited, "interleaved", torch.Generator().manual_seed(0), flow_copies=2, edit_weight=5)
    assert int((ex.row.kind == GEN).sum()) == 2 * 9 and ex.flow_target.shape == (18, backend.cfg.patch_dim)
    expected = torch.ones(9)
    expected[1] = 5.0
    assert torch.equal(ex.flow_weight, torch.cat([expected, expected]))
    out = backend.sft_losses([ex, backend.training_row(s, "text_only")])
    assert float(out["flow_weight"]) == 2 * 13 and int(out["n_patch"]) == 18


def test_training_row_labels(backend, samples):
    s = samples[0]
    tok = backend.tokenizer
    ctx = backend.build_context(s)
    row, labels, flow, _ = backend.training_row(s, "text_only")
    comp = _completion(backend, s)
    assert (labels[: len(ctx.row) - 1] == IGNORE).all()
    assert labels[len(ctx.row) - 1 : -1].tolist() == comp and flow.numel() == 0 and labels[-1] == IGNORE
    row, labels, _, _ = backend.training_row(s, "interleaved", torch.Generator().manual_seed(0))
    text = tok.encode(s.interleaved_trace()) + [backend.eos_id]
    assert labels[labels != IGNORE].tolist() == text  # every trace token, markers included, once
    trow, tlabels, _, _ = backend.training_row(s, "teacher_context")
    tctx = backend.build_context(s, role="teacher")
    assert tlabels[len(tctx.row) - 1 : -1].tolist() == comp


# --- scoring and decoding --------------------------------------------------------------------


def test_score_shapes_prefix_reuse_and_attention_path(backend, samples):
    ctxs = [backend.build_context(s) for s in samples[:2]]
    comps = [_completion(backend, samples[0]), [5, 6, 7], _completion(backend, samples[1]), [8]]
    V = len(backend.tokenizer)
    with torch.no_grad():
        sc = backend.score(ctxs, comps)  # 2 completions per context, prefix encoded once
        T = max(map(len, comps))
        assert sc.logits.shape == (4, T, V)
        assert sc.mask.sum(1).tolist() == [len(c) for c in comps]
        rep = backend.score([ctxs[0], ctxs[0], ctxs[1], ctxs[1]], comps)
        assert torch.allclose(sc.logits[sc.mask], rep.logits[sc.mask], atol=1e-5)
        hid = backend.score(ctxs, comps, output="hidden")
        assert hid.head_weight.shape == (V, backend.cfg.d_model)
        assert torch.allclose((hid.hidden @ hid.head_weight.T)[sc.mask], sc.logits[sc.mask], atol=1e-5)
        att = backend.score(ctxs, comps, output_attentions=True)
        assert torch.allclose(att.logits[sc.mask], sc.logits[sc.mask], atol=1e-5)
    assert len(att.attentions) == 4 and len(att.attentions[0]) == backend.cfg.n_layers
    w = att.attentions[1][0]  # row 1: context 0 + 3 completion tokens
    S_b = len(ctxs[0].row) + 3
    assert w.shape == (backend.cfg.n_heads, S_b, S_b)
    assert torch.allclose(w.sum(-1), torch.ones(backend.cfg.n_heads, S_b), atol=1e-5)
    assert float(torch.triu(w[:, ctxs[0].num_tokens :, :], diagonal=ctxs[0].num_tokens + 1).abs().max()) == 0
    with pytest.raises(ValueError, match="split evenly"):
        backend.score(ctxs, comps[:3])


def test_score_has_gradient_for_the_student(backend, samples):
    ctxs = [backend.build_context(samples[0])]
    sc = backend.score(ctxs, [_completion(backend, samples[0])])
    sc.logits.sum().backward()
    grads = [p.grad for p in backend.model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    backend.model.zero_grad(set_to_none=True)


def test_cached_decoding_matches_full_forward(backend, samples):
    """Greedy-decode a batch of different-length (left-padded) contexts with the KV cache, then
    score the same ids with one full forward per row: the logits must agree."""
    ctxs = [backend.build_context(s, role=r) for s, r in zip(samples, ["student", "teacher", "student"], strict=True)]
    dec = backend.decoder(ctxs, n=2)
    steps, logits_seen, fed = 6, [], []
    active = torch.ones(6, dtype=torch.bool)
    for _ in range(steps):
        logits_seen.append(dec.logits.clone())
        tok = dec.logits.argmax(-1)
        fed.append(tok)
        dec.step(tok, active)
    cached = torch.stack(logits_seen, 1)  # (6, steps, V)
    comps = torch.stack(fed, 1).tolist()
    with torch.no_grad():
        full = backend.score(ctxs, comps, output_attentions=True).logits  # no cache at all
    assert torch.allclose(cached, full, atol=1e-4)
    out = backend.sample(ctxs, n=2, max_new_tokens=steps, temperature=0.0, max_image_skips=0)
    assert [o.ids for o in out] == [c[: len(o.ids)] for c, o in zip(comps, out, strict=True)]


def test_sampling_is_seeded(backend, samples):
    ctxs = [backend.build_context(s) for s in samples[:2]]
    a = backend.sample(ctxs, n=3, max_new_tokens=5, generator=torch.Generator().manual_seed(1))
    b = backend.sample(ctxs, n=3, max_new_tokens=5, generator=torch.Generator().manual_seed(1))
    assert len(a) == 6 and [o.ids for o in a] == [o.ids for o in b]
    assert all(backend.tokenizer.pad_id not in o.ids and backend.tokenizer.bos_id not in o.ids for o in a)


# --- interleaved generation ------------------------------------------------------------------


def test_interleaved_generation_feeds_back_exactly_the_generated_image(backend, samples):
    """Script the text head so the model emits <image_start>, then a word, then eos; check that the
    returned image is the flow's output for that generator state, and that the hidden state the
    text after it is predicted from equals a full forward over [context, <image_start>, image,
    <image_end>]."""
    tok = backend.tokenizer
    model = backend.model
    word = tok.encode(" R")[0]
    plan = [backend.image_start_id, word, word, backend.eos_id, backend.eos_id]
    seen: list[torch.Tensor] = []
    real_logits = model.logits

    def scripted(hidden):
        seen.append(hidden.detach().clone())
        out = torch.zeros(*hidden.shape[:-1], len(tok))
        out[..., plan[min(len(seen) - 1, len(plan) - 1)]] = 1.0
        return out

    ctx = backend.build_context(samples[1])
    model.logits = scripted
    try:
        out = backend.generate_interleaved(
            [ctx], max_new_tokens=10, vt_steps=3, generator=torch.Generator().manual_seed(5)
        )[0]
    finally:
        del model.logits
    assert model.logits == real_logits
    S, E = backend.image_start_id, backend.image_end_id
    # calls: prefix -> <image_start>; after feeding it (unused); after the image -> word; ...
    assert out.ids[:2] == [S, E] and out.ids[-1] == backend.eos_id and out.finished
    assert len(out.images) == 1 and out.images[0].size == (16, 16)
    # the image is the flow's output from the same generator state, quantised to 8 bits
    dec = backend.decoder([ctx])
    dec.step(torch.tensor([S]), torch.ones(1, dtype=torch.bool))
    px = backend.generate_vts(dec, [0], [ctx.grid], 3, torch.Generator().manual_seed(5))[0]
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(_quantise(px)))
    # the hidden state after <image_end> comes from a context that holds exactly that image
    px_fed = to_pixels(out.images[0])
    assert torch.allclose(seen[2][0], _hidden_after_image(backend, ctx, px_fed), atol=1e-5)
    assert not torch.allclose(seen[2][0], _hidden_after_image(backend, ctx, -px_fed), atol=1e-3)


def _hidden_after_image(backend: MiniBackend, ctx, px: torch.Tensor) -> torch.Tensor:
    """Full forward (no cache) of [context, <image_start>, image, <image_end>]: the last state."""
    from visual_opsd.backends.mini import RowBuilder

    b = RowBuilder(backend.cfg.patch_size, backend.cfg.patch_dim, next_pos=ctx.next_pos, n_blocks=10)
    b.text([backend.image_start_id], None)
    b.image(px, UND)
    b.text([backend.image_end_id], None)
    tail, r = b.build(), ctx.row
    full = Row(
        kind=torch.cat([r.kind, tail.kind]),
        ids=torch.cat([r.ids, tail.ids]),
        rowcol=torch.cat([r.rowcol, tail.rowcol]),
        t=torch.cat([r.t, tail.t]),
        block=torch.cat([r.block, tail.block]),
        pos=torch.cat([r.pos, tail.pos]),
        patches=torch.cat([r.patches, tail.patches]),
    )
    with torch.no_grad():
        h, _ = backend.model(collate([full], backend.cfg.patch_dim, False))
    return h[0, -1]


def _quantise(px: torch.Tensor) -> Image.Image:
    from visual_opsd.backends.mini import to_image

    return to_image(px)


def test_interleaved_batch_and_given_vts(backend, samples):
    ctxs = [backend.build_context(s) for s in samples]
    outs = backend.generate_interleaved(ctxs, max_new_tokens=6, vt_steps=2, given_vts=[s.vt_images for s in samples])
    assert len(outs) == 3
    for o in outs:
        assert len(o.ids) <= 7 and o.text == backend.decode(o.ids)
        assert o.ids.count(backend.image_start_id) == o.ids.count(backend.image_end_id)


# --- persistence -----------------------------------------------------------------------------


def test_save_load_round_trip(backend, samples, tmp_path):
    backend.save(tmp_path / "m")
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["format"] == "visual_opsd.mini"
    loaded = MiniBackend.load(tmp_path / "m")
    loaded.model.eval()
    ctxs = [backend.build_context(s, role="teacher") for s in samples[:2]]
    comps = [_completion(backend, s) for s in samples[:2]]
    with torch.no_grad():
        a = backend.score(ctxs, comps).logits
        b = loaded.score([loaded.build_context(s, role="teacher") for s in samples[:2]], comps).logits
    assert torch.equal(a, b)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a mini-model"):
        MiniBackend.load(bad)


def test_padding_kind_is_never_attended(backend, samples):
    """A row padded on the left gives the same last hidden state as the row alone."""
    rows = [backend.build_context(s).row for s in samples[:2]]
    model = backend.model
    with torch.no_grad():
        batch, _ = model(collate(rows, model.cfg.patch_dim, left_pad=True))
        alone, _ = model(collate(rows[:1], model.cfg.patch_dim, left_pad=True))
    assert int((collate(rows, model.cfg.patch_dim, True).kind[0] == PAD).sum()) > 0
    assert torch.allclose(batch[0, -1], alone[0, -1], atol=1e-5)


# --- the interleaved-mode instruction and the pretraining rows --------------------------------

PROMPT = "Find a path ."  # words the fixture's vocabulary holds: the interleaved-mode instruction here


@pytest.fixture(scope="module")
def moded(backend) -> MiniBackend:
    return MiniBackend(backend.model, backend.tokenizer, interleaved_prompt=PROMPT)


def test_interleaved_mode_decodes_after_its_instruction(moded, samples, tmp_path):
    """generate_interleaved reads the instruction after the student context; text decoding does not.
    The trace context replays exactly the sequence generated from, so greedy ids are its argmaxes."""
    s = samples[0]
    (trace,) = moded.generate_interleaved([moded.build_context(s)], max_new_tokens=6, vt_steps=2, max_images=0)
    ctx = moded.build_trace_context(s, [], [])
    assert ctx.spans("mode") and ctx.num_tokens == moded.build_context(s).num_tokens + len(moded._mode_ids())
    scores = moded.score([ctx], [trace.ids])
    first = [j for j in range(len(trace.ids)) if j == 0 or trace.ids[j - 1] != moded.image_start_id]
    assert [int(scores.logits[0, j].argmax()) for j in first] == [trace.ids[j] for j in first]
    plain = moded.score([moded.build_context(s)], [trace.ids])  # without the instruction: other predictions
    assert not torch.allclose(plain.logits, scores.logits)
    moded.save(tmp_path / "m")
    assert MiniBackend.load(tmp_path / "m").interleaved_prompt == PROMPT


def test_interleaved_rows_carry_the_instruction_without_loss(moded, backend, samples):
    with_mode = moded.training_row(samples[0], "interleaved", torch.Generator().manual_seed(0))
    without = backend.training_row(samples[0], "interleaved", torch.Generator().manual_seed(0))
    n = len(moded._mode_ids())
    assert len(with_mode.row) == len(without.row) + n
    assert (with_mode.labels != IGNORE).sum() == (without.labels != IGNORE).sum()  # the instruction is context


def test_caption_rows_show_the_vt_alone_and_learn_the_text_only_trace(backend, samples):
    s = samples[1]
    ex = backend.training_row(s, "vt_caption")
    ctx = backend.caption_context(s)
    cells = s.vt_images[0].size[0] // backend.cfg.patch_size
    assert ctx.spans("vt_image") == [(2, 2 + cells * cells)] and not ctx.spans("problem_image")
    assert torch.equal(ex.row.ids[: ctx.num_tokens], ctx.row.ids)
    labelled = ex.labels[ex.labels != IGNORE].tolist()
    assert labelled == _completion(backend, s)  # the whole text-only completion, nothing of the context
    with pytest.raises(ValueError, match="needs a VT image"):
        backend.caption_context(replace(s, vt_images=[]))
