"""The BAGEL / ThinkMorph backend: every golden case of tests/data/bagel-golden (computed by the
official code on tiny random weights; tolerances from each case's outputs.json), the real 7B
geometry against the checkpoint manifest, the cache / CFG invariants, and Visual-OPSD end to end
on the tiny model. Measured errors are printed (`pytest -s`) and recorded as test properties."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import GOLD, bagel_tiny_folder, random_image
from PIL import Image
from safetensors.torch import load_file

pytest.importorskip("diffusers")

from visual_opsd.backends.bagel import BagelBackend, BagelLoadOptions, Stream, ToyTokenizer, sample_latent  # noqa: E402
from visual_opsd.backends.bagel_flow import (  # noqa: E402
    FluxVAE,
    cfg_combine,
    diffusers_vae_config,
    patchify_latent,
    resize_size,
    to_uint8,
    transform_image,
    unpatchify_latent,
)
from visual_opsd.backends.bagel_model import (  # noqa: E402
    BagelConfig,
    BagelModel,
    block_mask,
    is_generation_param,
    sincos_2d_table,
)
from visual_opsd.sample import Sample  # noqa: E402

BF16 = torch.bfloat16

pytestmark = pytest.mark.usefixtures("one_thread")


def case(name: str):
    d = GOLD / "cases" / name
    return (
        load_file(str(d / "inputs.safetensors")),
        load_file(str(d / "outputs.safetensors")),
        json.loads((d / "outputs.json").read_text())["tolerance"]["suggested_pass"],
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return bagel_tiny_folder(tmp_path_factory.mktemp("bagel_tiny"))


@pytest.fixture(scope="module")
def backend(folder) -> BagelBackend:
    return BagelBackend.from_folder(folder)  # bf16, as the official loader


@pytest.fixture(scope="module")
def model(backend) -> BagelModel:
    return backend.model


# ---------------------------------------------------------------------------------------------
# comparison helpers: every check records {"measured", "tolerance", "pass"} as a test property
# named "golden:<case>.<output>" (benchmarks/bagel_golden_report.py prints them as a table)

# measured metric -> (tolerance key, comparison) in outputs.json's `suggested_pass` blocks
TOL_KEYS = {
    "rel": ("rel", "le"),
    "max_abs": ("max_abs", "le"),
    "cos": ("cos_min", "ge"),
    "argmax_agree": ("argmax_equal_rows_margin_ge_0_08", "ge"),
    "top5_agree": ("top5_set_equal_rows_gap_ge_0_08", "ge"),
    "max_levels": ("max_abs_levels", "le"),
    "within1": ("frac_within1_min", "ge"),
    "exact_frac": ("frac_exact_min", "ge"),
    "equal": ("exact", "eq"),
}


def judge(metrics: dict, tol: dict) -> bool:
    """Whether every measured metric that the tolerance constrains is within it (and at least one is)."""
    checked = 0
    for metric, value in metrics.items():
        key, op = TOL_KEYS.get(metric, (None, None))
        if key not in tol:
            continue
        checked += 1
        bound = tol[key]
        if (
            (op == "le" and not value <= bound)
            or (op == "ge" and not value >= bound)
            or (op == "eq" and value != bound)
        ):
            return False
    return checked > 0


def report(record_property, name: str, metrics: dict, tol: dict) -> None:
    """Print and record one golden check; fail the test if it is outside its tolerance."""
    ok = judge(metrics, tol)
    text = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    print(f"[bagel golden] {name}: {text} tol={tol} {'PASS' if ok else 'FAIL'}")
    record_property(f"golden:{name}", json.dumps({"measured": metrics, "tolerance": tol, "pass": ok}))
    assert ok, (name, metrics, tol)


def rel_check(record_property, name, got, ref, tol: dict) -> None:
    got, ref = got.float(), ref.float()
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    d = (got - ref).abs().max().item()
    m = {
        "max_abs": d,
        "rel": d / ref.abs().max().item(),
        "cos": torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item(),
    }
    report(record_property, name, m, tol)


def logits_check(record_property, name, got, ref, tol: dict) -> None:
    """max|d|, cosine, argmax where the golden top-1 margin >= 0.08, top-5 set where the 5th-6th gap >= 0.08."""
    got, ref = got.float().reshape(-1, ref.shape[-1]), ref.float().reshape(-1, ref.shape[-1])
    d = (got - ref).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item()
    top = ref.topk(6, dim=-1).values
    sure = (top[:, 0] - top[:, 1]) >= 0.08
    argmax_ok = (got.argmax(-1) == ref.argmax(-1))[sure].float().mean().item() if sure.any() else 1.0
    gap = (top[:, 4] - top[:, 5]) >= 0.08
    same5 = torch.tensor(
        [set(got[r].topk(5).indices.tolist()) == set(ref[r].topk(5).indices.tolist()) for r in range(ref.shape[0])]
    )
    top5_ok = same5[gap].float().mean().item() if gap.any() else 1.0
    report(record_property, name, {"max_abs": d, "cos": cos, "argmax_agree": argmax_ok, "top5_agree": top5_ok}, tol)


def u8_check(record_property, name, got_u8, ref_u8, tol: dict) -> None:
    """uint8 images: largest level difference, fraction within one level, fraction exact."""
    u8 = (got_u8.int() - ref_u8.int()).abs()
    report(
        record_property,
        name,
        {
            "max_levels": int(u8.max()),
            "within1": u8.le(1).float().mean().item(),
            "exact_frac": u8.eq(0).float().mean().item(),
        },
        tol,
    )


def causal(n: int) -> torch.Tensor:
    return torch.ones(1, n, n, dtype=torch.bool).tril()


# ---------------------------------------------------------------------------------------------
# golden cases


def test_a_und_packed(model, record_property):
    i, o, tol = case("a_und_packed")
    with torch.no_grad():
        feats = model.vit_features(i["packed_vit_tokens"], i["packed_vit_position_ids"])
        rel_check(record_property, "a.vit_features", feats, o["vit_features"], tol["vit_features"])
        vit = model.embed_vit(i["packed_vit_tokens"], i["packed_vit_position_ids"])
        rel_check(record_property, "a.vit_token_embeds", vit, o["vit_token_embeds"], tol["vit_token_embeds"])
        x = torch.zeros(99, 64, dtype=BF16)
        x[i["packed_text_indexes"]] = model.embed_text(i["packed_text_ids"])
        x[i["packed_vit_token_indexes"]] = vit
        rel_check(record_property, "a.llm_input_embeds", x, o["llm_input_embeds"], tol["llm_input_embeds"])
        splits = [(int(n), mode) for n, mode in zip(i["split_lens"], ["causal", "full", "causal"], strict=True)]
        assert torch.equal(block_mask(splits), i["attention_allowed"])
        h = model.forward_llm(x[None], i["packed_position_ids"][None], None, i["attention_allowed"][None])[0]
        rel_check(record_property, "a.last_hidden", h, o["last_hidden"], tol["last_hidden"])
        logits = model.logits(h[i["logits_indexes"]])
    logits_check(record_property, "a.logits(all text rows)", logits, o["logits"], tol["logits(all text rows)"])
    logits_check(record_property, "a.next_token_logits", logits[-1], o["next_token_logits"], tol["next_token_logits"])
    assert int(logits[-1].float().argmax()) == int(o["next_token_argmax"])


def test_b_und_kvcache(model, record_property):
    i, o, tol = case("b_und_kvcache")
    with torch.no_grad():
        s = Stream(model)
        assert s.pos == int(i["call0_positions"][0])
        h0 = s.text(i["call0_token_ids"].tolist())
        rel_check(record_property, "b.call0_last_hidden", h0, o["call0_last_hidden"], tol["call0_last_hidden"])
        logits_check(record_property, "b.call0_logits", model.logits(h0), o["call0_logits"], tol["call0_logits"])
        # the ViT block through the same call the backend makes for an image
        assert torch.equal(i["call1_positions"], torch.full((50,), s.pos))
        h1 = s.image_block(model.embed_vit(i["call1_vit_tokens"], i["call1_vit_position_ids"]))
        rel_check(record_property, "b.call1_last_hidden", h1, o["call1_last_hidden"], tol["call1_last_hidden"])
        assert torch.equal(i["call2_positions"], torch.arange(s.pos, s.pos + 25))
        h2 = s.text(i["call2_token_ids"].tolist())
        logits_check(record_property, "b.call2_logits", model.logits(h2), o["call2_logits"], tol["call2_logits"])
        for layer in range(2):
            for kv, got in (("key", s.cache.keys[layer]), ("value", s.cache.values[layer])):
                name = f"cache.layer{layer}.{kv}"
                rel_check(record_property, f"b.{name}", got[0], o[name], tol[name])
        assert s.pos == int(i["call3_positions"][0])
        h3 = s.text(i["call3_token_ids"].tolist())
    logits_check(record_property, "b.decode_logits", model.logits(h3[-1]), o["decode_logits"], tol["decode_logits"])


def test_c_greedy_text(model, record_property):
    ib, _, _ = case("b_und_kvcache")
    i, o, tol = case("c_greedy_text")
    start = int(i["start_token_ids"][0])

    def generate(end_id: int, max_length: int = 10, forced: list[int] | None = None):
        """The reference's generate_text: feed, append K/V, argmax; the last argmax is not returned.
        With `forced`, step s feeds forced[s] instead of the previous argmax (teacher forcing)."""
        s = Stream(model)
        s.text(ib["call0_token_ids"].tolist())
        s.image_block(model.embed_vit(ib["call1_vit_tokens"], ib["call1_vit_position_ids"]))
        s.text(ib["call2_token_ids"].tolist())
        tokens, step_logits, fed = [start], [], start
        for step in range(max_length):
            logits = model.logits(s.text([fed if forced is None else forced[step]])[-1]).float()
            step_logits.append(logits)
            fed = int(logits.argmax())
            if fed == end_id:
                break
            tokens.append(fed)
        return tokens[:max_length], torch.stack(step_logits)

    with torch.no_grad():
        tokens, logits = generate(251)
        tokens2, logits2 = generate(200)
        _, forced = generate(251, forced=o["tokens"].tolist())
    tol_exact = {"exact": True}
    report(record_property, "c.tokens_equal", {"equal": tokens == o["tokens"].tolist()}, tol_exact)
    report(record_property, "c.run2_tokens_equal", {"equal": tokens2 == o["tokens_run2"].tolist()}, tol_exact)
    logits_check(record_property, "c.step_logits(free run)", logits, o["step_logits"], tol["step_logits(free run)"])
    logits_check(
        record_property, "c.step_logits_run2(free run)", logits2, o["step_logits_run2"], tol["step_logits(free run)"]
    )
    logits_check(
        record_property, "c.step_logits(teacher forced)", forced, o["step_logits"], tol["step_logits(teacher forced)"]
    )


@pytest.fixture(scope="module")
def vae(folder) -> FluxVAE:
    return FluxVAE.load(folder / "ae.safetensors", json.loads((GOLD / "configs/tiny/ae_config.json").read_text()))


def _edit_streams(model, vae, i):
    """Case d's context: text, VAE block, ViT block, text; and its two CFG branch contexts."""
    lat = vae.encode(i["vae_input_image"][None], eps=i["vae_eps"])[0]
    cond = Stream(model)
    cond.text(i["text1_ids"].tolist())
    cond.vae_image(patchify_latent(lat), (8, 6))
    cond.image_block(model.embed_vit(i["vit_tokens"], i["vit_position_ids"]))
    text_uncond = cond.fork()  # the reference copies the context before the last text
    cond.text(i["text2_ids"].tolist())
    img_uncond = Stream(model)
    img_uncond.text(i["text1_ids"].tolist())
    img_uncond.text(i["text2_ids"].tolist())
    return cond, text_uncond, img_uncond


def test_d_gen_velocity(model, vae, record_property):
    i, o, tol = case("d_gen_velocity")
    with torch.no_grad():
        rel_check(
            record_property,
            "d.vae_moments",
            vae.moments(i["vae_input_image"][None])[0],
            o["vae_moments"],
            tol["vae_moments"],
        )
        lat = vae.encode(i["vae_input_image"][None], eps=i["vae_eps"])[0]
        rel_check(record_property, "d.vae_latent", lat, o["vae_latent"], tol["vae_latent"])
        rel_check(
            record_property,
            "d.clean_latent_tokens",
            patchify_latent(lat),
            o["clean_latent_tokens"],
            tol["clean_latent_tokens"],
        )
        q = model.embed_latent(i["x_t"], i["timestep"], i["latent_position_ids"])
        rel_check(
            record_property, "d.query_embeds(latent rows)", q, o["query_embeds"][1:-1], tol["query_embeds(latent rows)"]
        )
        cond, tu, iu = _edit_streams(model, vae, i)
        assert (len(cond.cache), cond.pos, len(tu.cache), tu.pos, len(iu.cache), iu.pos) == (132, 34, 118, 20, 32, 32)
        t = i["timestep"]
        v, v_tu, v_iu = (s.velocity(i["x_t"], t, (8, 6)) for s in (cond, tu, iu))
    for name, got in (("v_cond", v), ("v_text_uncond", v_tu), ("v_img_uncond", v_iu)):
        rel_check(record_property, f"d.{name}", got, o[name], tol[name])
    combos = {
        "global": ("global", 0.0),
        "channel": ("channel", 0.0),
        "text_channel": ("text_channel", 0.0),
        "global_renorm_min_0.9": ("global", 0.9),
    }
    gold = [o[k].to(BF16) for k in ("v_cond", "v_text_uncond", "v_img_uncond")]
    for name, (renorm, rmin) in combos.items():
        got = cfg_combine(v, v_tu, v_iu, 4.0, 2.0, renorm, rmin)
        rel_check(record_property, f"d.v_cfg_{name}", got, o[f"v_cfg_{name}"], tol[f"v_cfg_{name}"])
        if rmin == 0.0:
            formula = cfg_combine(*gold, 4.0, 2.0, renorm, rmin)
            rel_check(
                record_property,
                f"d.cfg_formula_only_{name}",
                formula,
                o[f"v_cfg_{name}"],
                tol[f"cfg_formula_only_{name}"],
            )
    got = cfg_combine(v, v_tu, None, 4.0, 1.0, "global")
    rel_check(
        record_property, "d.v_cfg_text_only_global", got, o["v_cfg_text_only_global"], tol["v_cfg_text_only_global"]
    )


def test_cfg_branches_equal_recomputation(model, vae):
    """The forked text-uncond context (a copy taken before the last text) and the cond context that
    went on from the same cache give exactly the velocities of fresh prefills of those contexts."""
    i, _, _ = case("d_gen_velocity")
    with torch.no_grad():
        cond, tu, _ = _edit_streams(model, vae, i)
        lat = vae.encode(i["vae_input_image"][None], eps=i["vae_eps"])[0]
        fresh = Stream(model)
        fresh.text(i["text1_ids"].tolist())
        fresh.vae_image(patchify_latent(lat), (8, 6))
        fresh.image_block(model.embed_vit(i["vit_tokens"], i["vit_position_ids"]))
        t = i["timestep"]
        assert torch.equal(tu.velocity(i["x_t"], t, (8, 6)), fresh.velocity(i["x_t"], t, (8, 6)))
        fresh.text(i["text2_ids"].tolist())
        assert torch.equal(cond.velocity(i["x_t"], t, (8, 6)), fresh.velocity(i["x_t"], t, (8, 6)))


def _check_sampler(name, model, vae, streams, grid, sampler, record_property):
    i, o, tol = case(name)
    cond, tu, iu = streams
    ts, dts = i["timesteps"], i["dts"]
    s_txt, s_img, interval, renorm = sampler
    with torch.no_grad():
        trace: dict = {}
        x = sample_latent(
            cond, tu, iu, i["init_noise"].clone(), grid, ts, dts, s_txt, s_img, interval, renorm, trace=trace
        )
        forced = []  # each step from the golden state
        for k in range(len(ts)):
            tr: dict = {}
            sample_latent(
                cond,
                tu,
                iu,
                o["x_steps"][k].clone(),
                grid,
                ts[k : k + 1],
                dts[k : k + 1],
                s_txt,
                s_img,
                interval,
                renorm,
                trace=tr,
            )
            forced.append(tr["v"][0])
    report(
        record_property,
        f"{name}.cfg_applied_equal",
        {"equal": trace["cfg"] == o["cfg_applied"].tolist()},
        {"exact": True},
    )
    rel_check(
        record_property,
        f"{name}.v_steps(teacher forced)",
        torch.stack(forced),
        o["v_steps"],
        tol["v_steps(teacher forced)"],
    )
    rel_check(
        record_property, f"{name}.x_steps(free run)", torch.stack(trace["x"]), o["x_steps"], tol["x_steps(free run)"]
    )
    rel_check(record_property, f"{name}.final_latent_tokens", x, o["final_latent_tokens"], tol["final_latent_tokens"])
    z = model.cfg.z_channels
    lat = unpatchify_latent(x, *grid, z)
    rel_check(
        record_property, f"{name}.decoder_input", lat / vae.scale + vae.shift, o["decoder_input"], tol["decoder_input"]
    )
    with torch.no_grad():
        ours = vae.decode(lat[None])[0]  # our VAE runs in fp32 (the golden decode ran under bf16 autocast)
        gold_lat = unpatchify_latent(o["final_latent_tokens"], *grid, z)
        exact = vae.decode(gold_lat[None])[0]
    rel_check(record_property, f"{name}.decoded", ours, o["decoded"], tol["decoded"])
    u8_check(record_property, f"{name}.image_u8", to_uint8(ours), o["image_u8"], tol["image_u8"])
    rel_check(
        record_property, f"{name}.decoded(from golden latent)", exact, o["decoded"], tol["decoded(from golden latent)"]
    )
    u8_check(
        record_property,
        f"{name}.image_u8(from golden latent)",
        to_uint8(exact),
        o["image_u8"],
        tol["image_u8(from golden latent)"],
    )
    rel_check(
        record_property,
        f"{name}.decoded_fp32(from golden latent, no autocast)",
        exact,
        o["decoded_fp32"],
        tol["decoded_fp32(from golden latent, no autocast)"],
    )
    u8_check(
        record_property,
        f"{name}.image_u8_fp32(from golden latent, no autocast)",
        to_uint8(exact),
        o["image_u8_fp32"],
        tol["image_u8_fp32(from golden latent, no autocast)"],
    )


def test_e_t2i_denoise_decode(model, vae, record_property):
    i, _, _ = case("e_t2i_denoise_decode")
    with torch.no_grad():
        cond = Stream(model)
        cond.text(i["text_ids"].tolist())
        empty = Stream(model)  # the text-uncond context is empty: no cache at all, position 0
    _check_sampler(
        "e_t2i_denoise_decode",
        model,
        vae,
        (cond, empty, None),
        (6, 8),
        (4.0, 1.0, (0.4, 1.0), "global"),
        record_property,
    )


def test_f_edit_denoise_decode(model, vae, record_property):
    i, _, _ = case("d_gen_velocity")
    with torch.no_grad():
        streams = _edit_streams(model, vae, i)
    _check_sampler(
        "f_edit_denoise_decode", model, vae, streams, (8, 6), (4.0, 2.0, (0.0, 1.0), "text_channel"), record_property
    )


def test_g_vae_fp32(vae, record_property):
    i, o, tol = case("g_vae_fp32")
    with torch.no_grad():
        rel_check(record_property, "g.moments", vae.moments(i["image"][None])[0], o["moments"], tol["moments"])
        lat = vae.encode(i["image"][None], eps=i["eps"])[0]
        rel_check(record_property, "g.latent", lat, o["latent"], tol["latent"])
        rel_check(record_property, "g.decoded", vae.decode(lat[None])[0], o["decoded"], tol["decoded"])
        rel_check(record_property, "g.decoded_e", vae.decode(i["latent_e"][None])[0], o["decoded_e"], tol["decoded_e"])


def test_h_image_transform(record_property):
    i, o, _ = case("h_image_transform")
    table = json.loads((GOLD / "cases/h_image_transform/outputs.json").read_text())["size_table"]
    n, mismatches = 0, []
    for conf in table.values():
        p = conf["params"]
        for c in conf["cases"]:
            for img_num, key in ((1, "out_wh"), (2, "out_wh_img_num_2"), (4, "out_wh_img_num_4")):
                got = resize_size(
                    *c["in_wh"], p["max_image_size"], p["min_image_size"], p["image_stride"], p["max_pixels"], img_num
                )
                if list(got) != c[key]:
                    mismatches.append((p, c, img_num, got))
                n += 1
    report(
        record_property,
        "h.size_rule_mismatches",
        {"checks": n, "mismatches": len(mismatches), "equal": not mismatches},
        {"exact": True},
    )
    x = transform_image(Image.fromarray(i["input_u8"].numpy()), 980, 224, 14)
    resized = ((x * 0.5 + 0.5) * 255).round().to(torch.uint8).permute(1, 2, 0)
    report(record_property, "h.resized_u8", {"equal": torch.equal(resized, o["resized_u8"])}, {"exact": True})
    report(record_property, "h.tensor", {"max_abs": (x[:, 0] - o["tensor_row0"]).abs().max().item()}, {"max_abs": 0.0})


def test_i_train_packed_interleaved(model, record_property):
    i, o, tol = case("i_train_packed_interleaved")
    cfg = model.cfg
    t = torch.sigmoid(i["packed_timesteps_logit"])  # shift s = 1 leaves t as is; -inf gives t = 0
    rel_check(record_property, "i.timesteps_effective", t, o["timesteps_effective"], tol["timesteps_effective"])
    clean = torch.cat(
        [
            patchify_latent(i["padded_latent"][k][:, : 2 * h, : 2 * w])
            for k, (h, w) in enumerate(i["patchified_vae_latent_shapes"].tolist())
        ]
    )
    noised = (1 - t[:, None]) * clean + t[:, None] * i["noise"]
    noisy_rows = t > 0
    rel_check(record_property, "i.target", (i["noise"] - clean)[noisy_rows], o["target"], tol["target"])
    with torch.no_grad():
        L = i["packed_position_ids"].shape[0]
        x = torch.zeros(L, cfg.hidden_size, dtype=BF16)
        x[i["packed_text_indexes"]] = model.embed_text(i["packed_text_ids"])
        vit, start = [], 0
        for n in i["vit_token_seqlens"].tolist():  # one ViT call per image (each attends to itself)
            sl = slice(start, start + n)
            vit.append(model.embed_vit(i["packed_vit_tokens"][sl], i["packed_vit_position_ids"][sl]))
            start += n
        x[i["packed_vit_token_indexes"]] = torch.cat(vit)
        x[i["packed_vae_token_indexes"]] = model.embed_latent(noised, t, i["packed_latent_position_ids"])
        rel_check(record_property, "i.llm_input_embeds", x, o["llm_input_embeds"], tol["llm_input_embeds"])
        modes = ["causal", "full", "full", "causal", "causal", "noise", "full", "full", "causal"]
        assert torch.equal(block_mask(list(zip(i["split_lens"].tolist(), modes, strict=True))), i["attention_allowed"])
        gen = torch.zeros(L, dtype=torch.bool)
        gen[i["packed_vae_token_indexes"]] = True
        h = model.forward_llm(x[None], i["packed_position_ids"][None], gen[None], i["attention_allowed"][None])[0]
        rel_check(record_property, "i.last_hidden", h, o["last_hidden"], tol["last_hidden"])
        logits = model.logits(h[i["logits_indexes"]])
        preds = model.velocity(h[i["packed_vae_token_indexes"][noisy_rows]])
    logits_check(record_property, "i.logits", logits, o["logits"], tol["logits"])
    rel_check(record_property, "i.mse_preds", preds, o["mse_preds"], tol["mse_preds"])


# ---------------------------------------------------------------------------------------------
# the real geometry


def test_real_7b_config_matches_manifest():
    real = GOLD / "configs" / "real"
    manifest = json.loads((GOLD / "manifest" / "manifest_bagel7b.json").read_text())
    cfg = BagelConfig.from_json_files(
        json.loads((real / "llm_config.json").read_text()), json.loads((real / "vit_config.json").read_text())
    )
    with torch.device("meta"):
        model = BagelModel(cfg)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == manifest["ema"]  # names and shapes, exactly (1,223 tensors)
    und = sum(v.numel() for k, v in model.state_dict().items() if not is_generation_param(k))
    assert sum(v.numel() for v in model.state_dict().values()) == 14_607_260_128
    assert und == 8_052_719_008
    cfg.visual_gen = False
    with torch.device("meta"):
        und_model = BagelModel(cfg)
    assert {k: list(v.shape) for k, v in und_model.state_dict().items()} == {
        k: v for k, v in manifest["ema"].items() if not is_generation_param(k)
    }
    assert len(got) == 1223 and len(manifest["ae"]) == 244
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ae = json.loads((real / "ae_config.json").read_text())
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(diffusers_vae_config(ae))
    assert sum(p.numel() for p in vae.parameters()) == 83_819_683
    # the real ae.safetensors names / shapes (BFL layout) convert to exactly the diffusers model's, as on load
    bfl = {k: torch.empty(v, device="meta") for k, v in manifest["ae"].items()}
    converted = convert_ldm_vae_checkpoint(bfl, dict(vae.config))
    assert {k: list(v.shape) for k, v in converted.items()} == {k: list(v.shape) for k, v in vae.state_dict().items()}


def test_sincos_tables_are_the_checkpoint_tables():
    state = load_file(str(GOLD / "weights" / "ema.safetensors"))
    for key in ("vit_pos_embed.pos_embed", "latent_pos_embed.pos_embed"):
        assert torch.equal(sincos_2d_table(64, 8).to(BF16), state[key])


# ---------------------------------------------------------------------------------------------
# invariants and the backend


def _samples(n: int = 2) -> list[Sample]:
    return [
        Sample(
            id=f"s{k}",
            task="maze",
            question=f"Find the path {k}.",
            answer="R,D",
            problem_images=[random_image(k, (24, 24))],
            vt_images=[random_image(100 + k, (24, 24)), random_image(200 + k, (16, 24))],
            thoughts=["look", "go"],
            text_only_trace="right then down",
        )
        for k in range(n)
    ]


@pytest.fixture(scope="module")
def fp32_backend(folder) -> BagelBackend:
    return BagelBackend.from_folder(folder, understanding_only=True, dtype=torch.float32)


def test_golden_cached_decode_equals_packed(model):
    """In bf16 too, the three prefill calls + decode step give case a's packed last-row logits."""
    ia, _, _ = case("a_und_packed")
    ib, ob, _ = case("b_und_kvcache")
    with torch.no_grad():
        x = torch.zeros(99, 64, dtype=BF16)
        x[ia["packed_text_indexes"]] = model.embed_text(ia["packed_text_ids"])
        x[ia["packed_vit_token_indexes"]] = model.embed_vit(ia["packed_vit_tokens"], ia["packed_vit_position_ids"])
        h = model.forward_llm(x[None], ia["packed_position_ids"][None], None, ia["attention_allowed"][None])[0]
        s = Stream(model)
        s.text(ib["call0_token_ids"].tolist())
        s.image_block(model.embed_vit(ib["call1_vit_tokens"], ib["call1_vit_position_ids"]))
        s.text(ib["call2_token_ids"].tolist())
        last = s.text([250])[-1]
    assert torch.equal(model.logits(last), model.logits(h[-1]))


def test_kv_cache_causal_mask_is_bottom_right(fp32_backend):
    """A causal call of n_q rows against a cache (n_k keys in all) lets query i see key j iff
    j <= i + (n_k - n_q): the attention weights are zero exactly above that diagonal, and the call's
    hidden states equal the same rows of one packed causal forward."""
    model = fp32_backend.model
    ids = list(range(40, 60))
    with torch.no_grad():
        s = Stream(model)
        s.text(ids[:13])
        n_q = 7
        rows = model.embed_text(torch.tensor(ids[13:]))[None]
        attn: list = []
        h = model.forward_llm(rows, torch.arange(13, 20)[None], None, causal(n_q), s.cache, attentions=attn)[0]
        packed = model.forward_llm(model.embed_text(torch.tensor(ids))[None], torch.arange(20)[None], None, causal(20))[
            0
        ]
    n_k = 13 + n_q
    allowed = torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + (n_k - n_q)
    for probs in attn:  # (1, H, n_q, n_k)
        assert torch.equal(probs[0] > 0, allowed.expand_as(probs[0]))
    torch.testing.assert_close(h, packed[13:], atol=2e-5, rtol=1e-5)


def test_cached_decoding_equals_packed_scoring(fp32_backend):
    """Decoder steps (incremental, KV cache, bottom-right causal) = `score` (one packed prefix + one
    causal completion call), for teacher and student contexts of different lengths in one batch."""
    b = fp32_backend
    samples = _samples(2)
    ctxs = [b.build_context(samples[0], "teacher"), b.build_context(samples[1], "student")]
    comps = [[65, 66, 67, 68, 251], [70, 71, 251]]
    with torch.no_grad():
        scores = b.score(ctxs, comps)
        dec = b.decoder(ctxs)
        steps = [dec.logits.clone()]
        for t in range(4):
            ids = torch.tensor([comps[0][t], comps[1][min(t, 2)]])
            dec.step(ids, torch.tensor([True, t < 2]))
            steps.append(dec.logits.clone())
    for r, comp in enumerate(comps):
        for t in range(len(comp)):
            torch.testing.assert_close(steps[t][r], scores.logits[r, t].float(), atol=2e-5, rtol=1e-5)
    assert scores.mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2]


def test_contexts_segments_and_positions(backend):
    s = _samples(1)[0]
    st = backend.build_context(s, "student")
    te = backend.build_context(s, "teacher")
    assert [seg.kind for seg in te.segments].count("vt_image") == 2
    assert te.items[0].segment == "text" and backend.options.system_prompt  # ThinkMorph's system turn first
    sp = len(te.items[0].ids)
    # 6x6 ViT patches after a marker
    assert te.spans("problem_image") == st.spans("problem_image") == [(sp + 1, sp + 37)]
    # image blocks take one position each: next position = text ids + number of images
    n_text = sum(len(it.ids) for it in te.items if it.kind == "text")
    assert te.next_pos == n_text + 3 and st.items[-1].ids == [backend.bos_id]
    noise = backend.build_context(s, "teacher", "noise", generator=torch.Generator().manual_seed(0))
    vt = [it for it in noise.items if it.segment == "vt_image"]
    assert vt[1].vit_pixels.shape == (3, 24, 16) and abs(float(vt[1].vit_pixels.std()) - 1) < 0.2
    assert [it.segment for it in backend.build_context(s, "teacher", "none").items].count("vt_image") == 0


def test_sample_image_skip_injects_plain_text_markers(fp32_backend, monkeypatch):
    """A round ending with the *text* `<image_start>` gets `<|im_end|><|im_start|><image_end>` injected
    (sampled=False) and sampling goes on; past the budget the row stops."""
    b = fp32_backend
    inject = [b.eos_id, b.bos_id, *b.tokenizer.encode("<image_end>")]
    first = b.tokenizer.encode("go<image_start>")
    # next_token runs on every step, injected ones included (its id is then replaced): 0 = don't care
    script = [*first, *[0] * len(inject), *b.tokenizer.encode("ok<image_start>"), b.eos_id]
    calls = []

    def scripted(logits, *a, **k):
        calls.append(1)
        return torch.tensor([script[len(calls) - 1]] * logits.shape[0])

    monkeypatch.setattr("visual_opsd.backends.base.next_token", scripted)  # the shared sampling loop
    ctx = b.build_context(_samples(1)[0], "student")
    one = b.sample([ctx], max_new_tokens=60, max_image_skips=1)[0]
    assert one.ids[: len(first) + len(inject)] == first + inject
    assert one.sampled[len(first) : len(first) + len(inject)] == [False] * len(inject)
    assert one.image_skips == 1 and not one.finished and b.decode(one.ids).endswith("<image_start>")
    assert b.decode(one.ids) == "go<image_start><image_end>ok<image_start>"


def test_save_load_roundtrip(fp32_backend, tmp_path):
    b = fp32_backend
    b.save(tmp_path / "m")
    again = BagelBackend.from_folder(tmp_path / "m", dtype=torch.float32)
    assert not again.cfg.visual_gen and again.vae is None and isinstance(again.tokenizer, type(b.tokenizer))
    ctx = [b.build_context(_samples(1)[0], "teacher")]
    with torch.no_grad():
        assert torch.equal(b.score(ctx, [[65, 66, 251]]).logits, again.score(ctx, [[65, 66, 251]]).logits)


def test_understanding_only_has_no_generation_side(fp32_backend, backend):
    names = [n for n, _ in fp32_backend.model.named_parameters()]
    assert not any(is_generation_param(n) for n in names)
    # full mode: the generation side and the fixed tables are frozen, the understanding side trains
    frozen = {n for n, p in backend.model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in backend.model.named_parameters() if is_generation_param(n) or "pos_embed" in n}
    with pytest.raises(RuntimeError, match="understanding-only"):
        fp32_backend.generate_interleaved([fp32_backend.build_context(_samples(1)[0])])


def test_visual_opsd_steps_end_to_end(folder):
    """A few Visual-OPSD steps on the tiny model (understanding-only, fp32): on-policy rollouts with
    image skip, EMA teacher on C_T with VTs, student with gradient, logits and fused-hidden losses."""
    from visual_opsd.rollout import collect_rollout
    from visual_opsd.teacher import Teacher
    from visual_opsd.train import LossConfig, distill_loss, loss_normalizer
    from visual_opsd.vt import teacher_contexts

    b = BagelBackend.from_options(folder, BagelLoadOptions(dtype="float32", gradient_checkpointing=True))
    model = b.model
    samples = _samples(2)
    teacher = Teacher(model, "ema", 0.995)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = model.language_model.lm_head.weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(3):
        s_ctx = [b.build_context(s, "student") for s in samples]
        model.eval()
        ro = collect_rollout(b, samples, s_ctx, n=2, max_new_tokens=8, temperature=1.0, generator=gen)
        assert [len(i) for i in ro.ids] and all(0 < len(i) <= 8 for i in ro.ids)
        model.train()
        t_ctx = teacher_contexts(b, samples, samples, "data", gen)
        cfg = LossConfig(top_k=64, clip=0.05, fused=step == 2)
        normalizer = loss_normalizer([ro.loss_mask(max(len(i) for i in ro.ids))], cfg.reduction)
        loss = distill_loss(b, teacher, s_ctx, t_ctx, ro, cfg, normalizer, {})
        opt.zero_grad()
        loss.backward()
        assert model.vit_model.vision_model.embeddings.patch_embedding.weight.grad is not None
        opt.step()
        teacher.update()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and max(losses) > 0
    assert not torch.equal(before, model.language_model.lm_head.weight)


def test_kl_diagnostic_end_to_end(fp32_backend):
    from visual_opsd.diagnostics.kl import kl_diagnostic, kl_sanity

    samples = _samples(2)
    m = kl_diagnostic(fp32_backend, samples, max_new_tokens=6, batch_size=2, seed=0)
    for source in ("data", "student"):
        assert m[f"kl/{source}/pre/maze/mean"] > 0 and m[f"kl/{source}/pre/maze/n"] == 2
    sanity = kl_sanity(fp32_backend, samples, max_new_tokens=6, batch_size=2, seed=0)
    assert sanity["kl/sanity/identical/max_abs"] == 0.0 and sanity["kl/sanity/passed"] == 1.0


def test_generate_interleaved_end_to_end(backend, monkeypatch):
    """ThinkMorph's loop on the tiny model: a round asks for an image, a VT is generated with CFG
    (3 flow steps), decoded, re-encoded (VAE + ViT blocks) and the next round ends the answer."""
    b = backend
    script = [*b.tokenizer.encode("plan<image_start>"), b.eos_id, *b.tokenizer.encode("done"), b.eos_id]
    calls = []

    def scripted(logits, *a, **k):
        calls.append(1)
        return torch.tensor([script[len(calls) - 1]])

    monkeypatch.setattr("visual_opsd.backends.bagel.next_token", scripted)
    ctx = b.build_context(_samples(1)[0], "student")
    problem = next(it for it in ctx.items if it.segment == "problem_image")
    assert problem.vae_pixels is not None  # problem images also enter as VAE blocks here
    out = b.generate_interleaved(
        [ctx], max_new_tokens=40, vt_steps=3, max_images=1, generator=torch.Generator().manual_seed(0)
    )[0]
    assert out.finished and len(out.images) == 1 and out.images[0].size == (24, 24)
    assert out.text == "plan<image_start>done"
    vs, ve = b.image_start_id, b.image_end_id  # the VT's place in the trace: <|vision_start|><|vision_end|>
    assert out.ids == [b.bos_id, *script[:18], vs, ve, b.bos_id, *script[18:]]
    calls.clear()
    given = b.generate_interleaved([ctx], max_new_tokens=40, given_vts=[[random_image(7, (24, 24))]])[0]
    assert given.images[0].size == (24, 24) and given.finished


def test_example_config_validates():
    from visual_opsd.config import load_config
    from visual_opsd.train import TrainConfig

    path = Path(__file__).resolve().parents[1] / "configs" / "examples" / "train_thinkmorph7b.yaml"
    assert "visual-opsd train --config configs/examples/train_thinkmorph7b.yaml" in path.read_text()
    cfg = load_config(TrainConfig, path)  # as shipped, `backend:` section included
    opts = cfg.backend
    assert isinstance(opts, BagelLoadOptions) and opts.understanding_only and opts.gradient_checkpointing
    assert (cfg.teacher.mode, cfg.teacher.ema_decay, cfg.loss.top_k, cfg.loss.clip) == ("ema", 0.995, 256, 0.05)
    assert cfg.optim.lr == 1e-5 and cfg.optim.prompts_per_step == 16 and cfg.optim.steps == 1000


# ThinkMorph's training pipeline, as its released code has it: the inferencer's thinking system
# prompt (VLM_THINK_SYSTEM_PROMPT, thinkmorph/inferencer.py), the ViT ImageTransform of training
# (max 980, min 378, stride 14) and its pixel cap; the reference's values, typed out here.
REFERENCE_SYSTEM_PROMPT = """
Let's think step by step to answer the question. For text-based thinking, enclose the process within <think> </think>, e.g. <think> thinking process here </think>. For visual thinking, enclose the content within <image_start> </image_end>, e.g. <image_start> thinking image here </image_end>. Finally conclude with the final answer wrapped in <answer></answer> tags, i.e.<answer> answer here </answer>.
"""  # noqa: E501


def test_thinkmorph_recipe_is_the_default(folder):
    """A BAGEL folder opened for a run asks as ThinkMorph's training pipeline does: its system prompt
    first on both sides, its ViT transform and pixel cap; each can be overridden in `backend:`."""
    from visual_opsd.backends.bagel import BagelOptions
    from visual_opsd.backends.bagel_flow import resize_size
    from visual_opsd.config import load_config
    from visual_opsd.train import TrainConfig

    o = BagelOptions()
    assert o.system_prompt == REFERENCE_SYSTEM_PROMPT
    assert (o.vit_transform, o.max_pixels) == ((980, 378, 14), 2_007_040)
    assert resize_size(1200, 600, *o.vit_transform, o.max_pixels) == (980, 490)  # long side to 980, stride 14
    assert resize_size(200, 100, *o.vit_transform, o.max_pixels) == (756, 378)  # short side up to 378
    # the shipped example config keeps them (no 518/224 override: that is the KL script's transform)
    example = Path(__file__).resolve().parents[1] / "configs" / "examples" / "train_thinkmorph7b.yaml"
    cfg = load_config(TrainConfig, example)
    assert cfg.backend.vit_transform is None and cfg.backend.system_prompt is None
    b = BagelBackend.from_options(folder, BagelLoadOptions(dtype="float32", vit_transform=(24, 8, 4)), device="cpu")
    s = _samples(1)[0]
    student, teacher = b.build_context(s, "student"), b.build_context(s, "teacher")
    system = b._text(REFERENCE_SYSTEM_PROMPT)
    assert student.items[0].ids == teacher.items[0].ids == system
    framing = next(it for it in teacher.items if it.segment == "framing")
    assert framing.ids == b._text(b.options.framing_text)
    # overridable: no system turn, other framing texts
    plain = BagelBackend.from_options(folder, BagelLoadOptions(dtype="float32", system_prompt="", framing_text="See:",
                                                               transition_text="Go."), device="cpu")
    t = plain.build_context(s, "teacher")
    assert t.items[0].segment == "problem_image" and plain.options.framing_text == "See:"
    assert [it.ids for it in t.items if it.segment == "framing"] == [plain._text("See:")]


def test_output_attentions_for_diagnostics(fp32_backend):
    """`score(output_attentions=True)`: one full forward per completion, the same logits, and per layer
    (H, S_b, S_b) weights over context + completion whose segments index the context's rows."""
    b = fp32_backend
    ctxs = [b.build_context(s, "teacher") for s in _samples(2)]
    comps = [[65, 66, 67, 251], [70, 251]]
    with torch.no_grad():
        plain = b.score(ctxs, comps)
        full = b.score(ctxs, comps, output_attentions=True)
    torch.testing.assert_close(full.logits[full.mask], plain.logits[plain.mask], atol=2e-5, rtol=1e-5)
    for r, comp in enumerate(comps):
        S = ctxs[r].num_tokens + len(comp)
        layers = full.attentions[r]
        assert len(layers) == b.cfg.num_layers and layers[0].shape == (b.cfg.num_heads, S, S)
        torch.testing.assert_close(layers[1].sum(-1), torch.ones(b.cfg.num_heads, S))
        (vt0, vt1), end = ctxs[r].spans("vt_image")[0], ctxs[r].num_tokens
        assert layers[0][:, end - 1, vt0:vt1].sum() > 0  # the answer's first row sees the VT
        assert float(layers[0][:, vt0, end:].abs().max()) == 0.0  # nothing sees the future


def test_attention_diagnostic_end_to_end(backend, monkeypatch):
    """The generic attention diagnostic on BAGEL traces: generated and noise VTs (scripted text)."""
    from visual_opsd.diagnostics.attention import attention_fractions

    b = backend
    script = [*b.tokenizer.encode("plan<image_start>"), b.eos_id, *b.tokenizer.encode("done"), b.eos_id]
    calls = []

    def scripted(logits, *a, **k):
        calls.append(1)
        return torch.tensor([script[(len(calls) - 1) % len(script)]])

    monkeypatch.setattr("visual_opsd.backends.bagel.next_token", scripted)
    m = attention_fractions(b, _samples(1), vt_steps=2, max_new_tokens=40, batch_size=1)
    assert m["attention/generated/no_vt"] == 0 and m["attention/n_layers"] == b.cfg.num_layers
    for kind in ("generated", "noise"):
        frac = m[f"attention/{kind}/text_after_vt->vt/all_layers/mean"]
        assert 0.0 < frac < 1.0


def test_sharded_weights_and_fp32_rope(folder, tmp_path, model):
    """ThinkMorph-style `model-*.safetensors` shards load like `ema.safetensors`; and the model holds
    no buffer (RoPE inverse frequencies are recomputed in fp32), so a blanket `.to(bfloat16)` cannot
    round them (the README's 0.016 logit shift)."""
    from safetensors.torch import save_file

    state = load_file(str(folder / "ema.safetensors"))
    keys = sorted(state)
    shard = tmp_path / "shard"
    bagel_tiny_folder(shard)
    (shard / "ema.safetensors").unlink()
    save_file({k: state[k] for k in keys[:50]}, str(shard / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in keys[50:]}, str(shard / "model-00002-of-00002.safetensors"))
    b = BagelBackend.from_folder(shard)
    assert all(torch.equal(b.model.state_dict()[k], model.state_dict()[k]) for k in keys)
    assert list(model.buffers()) == []


@pytest.mark.slow  # train + resume, diagnose kl and eval through the command line
def test_cli_train_diagnose_eval_end_to_end(tmp_path, monkeypatch):
    """The commands on a tiny BAGEL folder (released layout): `train` (3 Visual-OPSD steps and a resume;
    the generation side stays bit-identical), `diagnose kl` with the trained model as post, and `eval`
    with the teacher in interleaved mode (scripted text, so that a VT is generated, decoded and
    re-encoded) beside the student in text mode."""
    from safetensors.torch import load_file

    from visual_opsd.backends import backend_kind
    from visual_opsd.cli import main

    tiny = bagel_tiny_folder(tmp_path / "tiny")
    assert backend_kind(tiny) == "bagel"
    run = tmp_path / "opsd"
    common = ["threads=1", "progress=false"]
    train = [
        "train",
        "--config",
        str(Path(__file__).resolve().parents[1] / "configs" / "train_demo.yaml"),
        f"init_from={tiny}",
        f"out_dir={run}",
        *common,
        "data.n_train=8",
        "data.n_val=2",
        "optim.steps=3",
        "optim.prompts_per_step=2",
        "optim.warmup_steps=1",
        "rollout.max_new_tokens=8",
        "eval.every=3",
        "eval.max_new_tokens=8",
        "save_every=2",
        "loss.fused=true",
    ]
    assert main(train) == 0
    assert main(["train", "--config", str(run / "config.json"), "--resume", str(run / "last"), "optim.steps=4"]) == 0
    assert backend_kind(run / "last" / "model") == "bagel"
    before = load_file(str(tiny / "ema.safetensors"))
    after = load_file(str(run / "last" / "model" / "model.safetensors"))
    assert set(before) == set(after)
    assert all(torch.equal(before[k].float(), after[k].float()) for k in before if is_generation_param(k))
    assert not torch.equal(before["language_model.lm_head.weight"].float(), after["language_model.lm_head.weight"])

    diag = tmp_path / "diag"
    assert (
        main(
            [
                "diagnose",
                "kl",
                "--model",
                str(tiny),
                "--post",
                str(run / "last"),
                f"out_dir={diag}",
                *common,
                "data.n=2",
                "kl.max_new_tokens=8",
                "kl.sanity_samples=2",
            ]
        )
        == 0
    )
    kl = json.loads((diag / "kl.json").read_text())["metrics"]
    assert kl["kl/sanity/passed"] == 1.0 and kl["kl/data/pre/maze/mean"] > 0

    enc = ToyTokenizer().encode
    script = [*enc("plan<image_start>"), 251, *enc("done"), 251]
    calls, vts = [], []

    def scripted(logits, *a, **k):
        calls.append(1)
        return torch.tensor([script[(len(calls) - 1) % len(script)]] * logits.shape[0])

    monkeypatch.setattr("visual_opsd.backends.bagel.next_token", scripted)
    real_vt = BagelBackend._generate_vt
    monkeypatch.setattr(BagelBackend, "_generate_vt", lambda self, *a, **k: vts.append(1) or real_vt(self, *a, **k))
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--system",
                f"teacher={tiny}:interleaved",
                "--system",
                f"opsd={run / 'last'}:text",
                "--n",
                "2",
                "--warmup",
                "0",
                "--max-new-tokens",
                "40",
                "--vt-steps",
                "2",
                "--out",
                str(out),
                "--no-progress",
                "threads=1",
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    # one VT per teacher answer: 2 in the batched accuracy pass, 2 more when the latency pass times them
    assert set(results) >= {"teacher", "opsd"} and len(vts) == 4
    records = [json.loads(line) for line in (out / "records" / "teacher_maze.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in records] == ["plan<image_start>done"] * 2
