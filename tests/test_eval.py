"""`visual-opsd eval` on a tiny mini model: the files and their shapes, accuracies recounted from the
per-sample records with the scorers applied independently, per-size and VSP per-level breakdowns,
batched greedy predictions equal to batch-1 ones, text modes in one round (no image skip) unless
asked, the teacher-context mode, the demo's evaluation stage through the same code, and clear
errors for bad systems and data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import VSP_EXAMPLES

from visual_opsd import evaluate as ev
from visual_opsd.backends.base import Decoder
from visual_opsd.backends.mini import MiniBackend
from visual_opsd.cli import main
from visual_opsd.sft import batches, predict
from visual_opsd.stats import wilson_interval
from visual_opsd.tasks import get_task
from visual_opsd.tasks.maze import shortest_path
from visual_opsd.tasks.vsp_rules import read_table, score_strict, score_vsp
from visual_opsd.tokenizer import build_tokenizer_for_tasks

FAST = ["--warmup", "1", "--max-new-tokens", "6", "--vt-steps", "2", "--no-progress", "threads=1"]
TASK_KEYS = {"accuracy", "ci95", "n", "latency_s", "latency_n", "tokens", "by_size"}
RECORD_KEYS = {"id", "mode", "prediction", "parsed", "answer", "correct", "latency_s", "tokens", "size"}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    tokenizer = build_tokenizer_for_tasks(["maze"], n_per_task=20)
    path = tmp_path_factory.mktemp("tiny") / "final"
    MiniBackend.new(tokenizer, seed=0, d_model=32, n_layers=1, n_heads=2, patch_size=4, max_grid=8).save(path)
    return path


@pytest.fixture(scope="module")
def sharp() -> MiniBackend:
    """A tiny random model with sharpened weights (matrices x6): unlike the plain tiny one, its greedy
    answers differ from maze to maze, in content and length, so comparing two decodings means something."""
    torch.set_num_threads(1)
    tokenizer = build_tokenizer_for_tasks(["maze"], n_per_task=20)
    # seed 4: its answers vary in every mode (some seeds answer every maze alike in one mode; the tests
    # below check that they do not, so a vacuous fixture fails loudly rather than passing)
    backend = MiniBackend.new(tokenizer, seed=4, d_model=32, n_layers=2, n_heads=2, patch_size=4, max_grid=8)
    with torch.no_grad():
        for p in backend.model.parameters():
            if p.dim() >= 2:
                p.mul_(6.0)
    return backend


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_accuracy(entry: dict, records: list[dict]) -> None:
    k, n = sum(r["correct"] for r in records), len(records)
    lo, hi = wilson_interval(k, n)
    assert entry["n"] == n and entry["accuracy"] == pytest.approx(100 * k / n)
    assert entry["ci95"] == pytest.approx([100 * lo, 100 * hi])


def check_summary(entry: dict, records: list[dict]) -> None:
    """The summary numbers are those of the records, recounted here: accuracy and tokens over all of
    them, latency over the timed ones, accuracy per maze size."""
    check_accuracy(entry, records)
    timed = [r["latency_s"] for r in records if r["latency_s"] is not None]
    assert entry["latency_n"] == len(timed) >= 1 and all(t > 0 for t in timed)
    assert entry["latency_s"] == pytest.approx(sum(timed) / len(timed))
    assert entry["tokens"] == pytest.approx(sum(r["tokens"] for r in records) / len(records))
    sizes = sorted({r["size"] for r in records})
    assert list(entry["by_size"]) == [str(size) for size in sizes]
    for size in sizes:
        assert set(entry["by_size"][str(size)]) == {"accuracy", "ci95", "n"}
        check_accuracy(entry["by_size"][str(size)], [r for r in records if r["size"] == size])


def test_eval_on_generated_mazes(model, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = [
        "eval",
        "--system",
        f"fast={model}",
        "--system",
        f"slow={model}:interleaved",
        "--n",
        "4",
        "--sizes",
        "3",
        "4",
        "--seed",
        "5",
        "--out",
        str(out),
        *FAST,
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["fast", "slow"]
    mazes = {s.id: s for s in get_task("maze").generate(4, seed=5, split="test", sizes=(3, 4), cell_px=4)}
    for name, mode in (("fast", "text"), ("slow", "interleaved")):
        system = results[name]
        assert {"accuracy", "latency_s", "tokens", "tasks"} <= set(system) and system["mode"] == mode
        assert set(system["tasks"]) == {"maze"} and set(system["tasks"]["maze"]) == TASK_KEYS
        records = read_jsonl(out / "records" / f"{name}_maze.jsonl")
        assert [r["id"] for r in records] == list(mazes)  # the held-out test split, as generated
        for r in records:
            assert RECORD_KEYS <= set(r) and r["mode"] == mode and r["tokens"] >= 1
            assert r["size"] == mazes[r["id"]].metadata["size"]
            # the verdict, recomputed from the prediction with the strict scorer on the true map
            assert r["correct"] == score_strict(mazes[r["id"]].metadata["grid"], r["prediction"]).correct
        check_summary(system["tasks"]["maze"], records)
        assert system["accuracy"] == system["tasks"]["maze"]["accuracy"]
    md = (out / "results.md").read_text()
    assert "| fast |" in md and "| slow |" in md and "latency of `slow`" in md  # speed-up vs the interleaved one
    assert "## Accuracy per maze size" in md and "| fast | maze | " in md and "size 4: acc %" in md
    assert (out / "pareto.png").stat().st_size > 0
    assert json.loads((out / "config.json").read_text())["data"]["sizes"] == [3, 4]
    assert "results:" in capsys.readouterr().out


def test_eval_on_a_dataset_folder(model, tmp_path):
    from visual_opsd.data import write_dataset

    write_dataset(get_task("maze").generate(3, seed=1, split="val", sizes=(3, 3), cell_px=4), tmp_path / "d")
    out = tmp_path / "eval"
    argv = ["eval", "--system", f"m={model}", "--data", str(tmp_path / "d"), "--n", "2", "--out", str(out)]
    assert main(argv + FAST) == 0
    system = json.loads((out / "results.json").read_text())["m"]
    assert set(system["tasks"]) == {"d"} and system["tasks"]["d"]["n"] == 2  # a column per dataset, named by it
    records = read_jsonl(out / "records" / "m_d.jsonl")
    assert [r["id"] for r in records] == ["maze-val-0", "maze-val-1"] and {r["task"] for r in records} == {"maze"}


def test_eval_on_vsp_maps_per_level(model, tmp_path):
    out = tmp_path / "vsp"
    argv = ["eval", "--system", f"m={model}:text", "--vsp", str(VSP_EXAMPLES), "--out", str(out), "vsp_per_level=1"]
    assert main(argv + FAST) == 0
    system = json.loads((out / "results.json").read_text())["m"]
    assert set(system["tasks"]) == {"vsp"}  # --vsp alone: no generated mazes
    records = read_jsonl(out / "records" / "m_vsp.jsonl")
    grids = {
        (lv, i): read_table(VSP_EXAMPLES / f"level{lv}" / "table" / f"{i}.txt")
        for lv, i in ((int(p.parts[-3][5:]), int(p.stem)) for p in VSP_EXAMPLES.glob("level*/table/*.txt"))
    }
    assert sorted((r["level"], r["index"]) for r in records) == sorted(grids)
    for r in records:
        grid = grids[(r["level"], r["index"])]
        assert r["verdicts"]["strict"]["correct"] == score_strict(grid, r["prediction"]).correct
        assert r["verdicts"]["vsp"]["correct"] == score_vsp(grid, r["prediction"]).correct
        assert r["correct"] == r["verdicts"]["strict"]["correct"]  # the default headline rule
    check_summary(system["tasks"]["vsp"], records)
    vsp = system["vsp"]
    assert vsp["rule"] == "strict" and set(vsp["levels"]) == {"3", "4", "5", "6", "7", "8"}
    for block in vsp["levels"].values():
        assert block["n"] == 1 and set(block) == {"n", "latency_s", "latency_n", "tokens", "strict", "vsp"}
        assert {"accuracy", "ci95"} == set(block["strict"]) == set(block["vsp"])
    assert "## VSP maze maps, per level" in (out / "results.md").read_text()


def test_vsp_rules_reported_side_by_side(model, tmp_path, monkeypatch):
    """Scripted answers whose verdicts differ by rule: the per-level and overall numbers of both rules,
    and --rule choosing the headline."""

    def answer(s) -> str:
        moves = ", ".join(shortest_path(s.metadata["grid"]))
        level = s.metadata["level"]
        if level in (3, 4):
            return f"\\boxed{{{moves}}}"  # strict only
        if level == 5:
            return f"Action plan: {moves}"  # vsp rule only
        if level == 6:
            return f"\\boxed{{{moves}}}\nAction plan: {moves}"  # both (the plan runs to the end)
        return "no idea"

    def scripted(backend, samples, mode, *args, **kwargs):
        return [answer(s) for s in samples]

    monkeypatch.setattr(ev, "predict", scripted)
    out = tmp_path / "rules"
    argv = ["eval", "--system", f"m={model}", "--vsp", str(VSP_EXAMPLES), "--rule", "vsp", "--out", str(out), *FAST]
    assert main(argv) == 0
    system = json.loads((out / "results.json").read_text())["m"]
    vsp = system["vsp"]
    assert vsp["rule"] == "vsp"
    assert vsp["strict"]["accuracy"] == pytest.approx(100 * 3 / 6)
    assert vsp["vsp"]["accuracy"] == pytest.approx(100 * 2 / 6)
    assert system["tasks"]["vsp"]["accuracy"] == pytest.approx(100 * 2 / 6)  # the headline rule
    expected = {"3": (100, 0), "4": (100, 0), "5": (0, 100), "6": (100, 100), "7": (0, 0), "8": (0, 0)}
    got = {lv: (b["strict"]["accuracy"], b["vsp"]["accuracy"]) for lv, b in vsp["levels"].items()}
    assert got == expected


@pytest.mark.filterwarnings("ignore:No artists with labels")  # no training curves here
def test_demo_evaluation_stage_uses_the_shared_code(model, tmp_path):
    from visual_opsd.data import write_dataset
    from visual_opsd.demo import BASE_SYSTEMS, SYSTEMS, TRAINED_SYSTEMS, _evaluate_systems, _write_report

    out = tmp_path / "demo"
    write_dataset(get_task("maze").generate(3, seed=2, split="test", sizes=(3, 3), cell_px=4), out / "data" / "test")
    backend = MiniBackend.load(model)
    for folder in ("sft_teacher/final", "sft_text/final", "opsd/best/model", "opsd_noise/last/model"):
        backend.save(out / folder)
    # the demo's two evaluation stages: the base systems, then the trained ones, which write the whole table
    _evaluate_systems(out, {"warmup": 0, "max_new_tokens": 6}, BASE_SYSTEMS)
    _evaluate_systems(out, {"warmup": 0, "max_new_tokens": 6}, TRAINED_SYSTEMS)
    results = json.loads((out / "eval" / "results.json").read_text())
    assert list(results) == [name for name, _, _ in SYSTEMS]
    for name, r in results.items():
        folder = "eval" if name in TRAINED_SYSTEMS else "eval_base"
        check_summary(r["tasks"]["maze"], read_jsonl(out / folder / "records" / f"{name}_maze.jsonl"))
    _write_report(out, {}, {"eval": 1.0})
    report = json.loads((out / "report.json").read_text())
    assert report["systems"]["opsd"]["tasks"]["maze"] == results["opsd"]["tasks"]["maze"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{model}", "is not NAME=MODEL_DIR[:MODE]"),
        ("a={model}:txt", "unknown mode 'txt'; did you mean 'text'?"),
        ("a={model}/nowhere:text", "system 'a': no model folder at"),
        ("a={empty}", "not a model folder this package can load"),
        ("a b={model}", "name 'a b' may hold only"),
    ],
)
def test_bad_system_spec_is_a_clear_error(model, tmp_path, capsys, spec, message):
    (tmp_path / "empty").mkdir()
    spec = spec.format(model=model, empty=tmp_path / "empty")
    assert main(["eval", "--system", spec, "--out", str(tmp_path / "o"), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("visual-opsd: config error:") and message in err
    assert not (tmp_path / "o").exists()  # nothing ran, nothing written


def test_duplicate_names_missing_systems_and_empty_data(model, tmp_path, capsys):
    assert main(["eval", "--system", f"a={model}", "--system", f"a={model}:interleaved", *FAST]) == 2
    assert "repeated: a" in capsys.readouterr().err
    assert main(["eval", "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "no systems" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--system", f"a={model}", "--data", str(tmp_path / "empty"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "data error" in err and "empty" in err
    assert main(["eval", "--system", f"a={model}", "--vsp", str(tmp_path / "empty"), *FAST]) == 2
    assert "not a VSP folder" in capsys.readouterr().err


# --- batched accuracy pass, latency sample, image skips, teacher context -----------------------


def mazes(n: int, seed: int = 3, sizes: tuple[int, int] = (3, 6)) -> list:
    return get_task("maze").generate(n, seed=seed, split="test", sizes=sizes, cell_px=4)


@pytest.mark.parametrize("mode", ["text", "teacher_context", "given_vt"])
def test_batched_greedy_predictions_equal_batch_one(sharp, mode):
    """The accuracy pass decodes left-padded batches of mixed maze sizes; its greedy answers are those of
    batch size 1. The logits themselves differ by float noise (about 1e-6 on this model, as batched
    matrix products sum in another order), far below the gaps between top ids, so the argmaxes agree.
    (`interleaved` draws its VT noise per batch, so its VTs, not its text decoding, depend on the batch.)"""
    samples = mazes(16)
    alone = [predict(sharp, [s], mode, max_new_tokens=24)[0] for s in samples]
    assert len(set(alone)) >= 4 and len({len(a) for a in alone}) >= 3  # answers differ: not vacuous
    for batch_size in (16, 5):
        assert predict(sharp, samples, mode, max_new_tokens=24, batch_size=batch_size) == alone


def test_batches_group_similar_sizes_and_never_mix_vt_counts():
    samples = mazes(20)
    samples[7] = dataclasses.replace(samples[7], vt_images=[])  # a sample without VTs: a batch of its own
    out = batches(samples, 6)
    assert sorted(i for b in out for i in b) == list(range(20)) and all(1 <= len(b) <= 6 for b in out)
    assert [7] in out
    areas = [samples[i].problem_images[0].width * samples[i].problem_images[0].height for b in out for i in b if i != 7]
    assert areas == sorted(areas)  # similar context lengths share a batch (little padding)


def test_evaluate_batches_accuracy_and_times_evenly_spaced_samples(sharp, monkeypatch):
    calls: list[int] = []
    real = ev.predict

    def spy(backend, samples, mode, *args, **kwargs):
        calls.append(len(samples))
        return real(backend, samples, mode, *args, **kwargs)

    monkeypatch.setattr(ev, "predict", spy)
    samples = mazes(10)
    result = ev.evaluate(
        sharp, samples, get_task("maze"), "text", max_new_tokens=8, batch_size=4, latency_n=3, warmup=1, progress=False
    )
    assert sum(calls[:-4]) == 10 and max(calls[:-4]) == 4  # the accuracy pass: batches of at most 4
    assert calls[-4:] == [1, 1, 1, 1]  # one warm-up, then three timed samples at batch size 1
    timed = [i for i, r in enumerate(result.records) if r["latency_s"] is not None]
    assert timed == ev.latency_items(10, 3) == [0, 3, 6] and result.latency_n == 3
    assert result.latency_s == pytest.approx(sum(result.records[i]["latency_s"] for i in timed) / 3)
    assert [r["prediction"] for r in result.records] == [real(sharp, [s], "text", 8)[0] for s in samples]
    assert ev.latency_items(4, 16) == [0, 1, 2, 3]  # a short benchmark: every sample timed
    check_summary(result.summary(), result.records)


class _Scripted(Decoder):
    """Every row emits `script` one id per step, whatever it is fed (an injected id takes a step's place)."""

    def __init__(self, rows: int, script: list[int], vocab: int):
        self.script, self.vocab, self.k = script, vocab, [0] * rows
        self._refresh()

    def _refresh(self) -> None:
        self.logits = torch.zeros(len(self.k), self.vocab)
        for b, k in enumerate(self.k):
            self.logits[b, self.script[min(k, len(self.script) - 1)]] = 10.0

    def step(self, ids, active):
        for b in torch.nonzero(active).flatten().tolist():
            self.k[b] += 1
        self._refresh()


def test_text_mode_ends_at_image_start_unless_skips_are_allowed(model, tmp_path, monkeypatch):
    """One text round by default (the reference's inferencer): an emitted `<image_start>` ends the answer,
    which is scored as it stands; --image-skips 1 injects `<image_end>` and decoding goes on."""
    from visual_opsd.data import write_dataset

    backend = MiniBackend.load(model)
    (sample,) = mazes(1, sizes=(3, 3))
    tok = backend.tokenizer
    right = tok.encode(f"\\boxed{{{', '.join(shortest_path(sample.metadata['grid']))}}}")
    wrong = tok.encode(" so \\boxed{U}")
    S, E, filler = backend.image_start_id, backend.image_end_id, tok.encode(" R")[0]
    script = [*right, S, filler, *wrong, backend.eos_id]  # the filler's step is taken by the injected E
    monkeypatch.setattr(
        MiniBackend, "decoder", lambda self, contexts, n=1, model=None: _Scripted(len(contexts) * n, script, len(tok))
    )
    assert predict(backend, [sample], "text") == [backend.decode([*right, S])]
    assert predict(backend, [sample], "text", image_skips=1) == [backend.decode([*right, S, E, *wrong])]

    write_dataset([sample], tmp_path / "d")
    for flags, correct in (([], True), (["--image-skips", "1"], False)):
        out = tmp_path / f"eval{len(flags)}"
        argv = [
            "eval",
            "--system",
            f"m={model}",
            "--data",
            str(tmp_path / "d"),
            "--out",
            str(out),
            *flags,
            *FAST,
            "--max-new-tokens",
            "40",
        ]
        assert main(argv) == 0
        (record,) = read_jsonl(out / "records" / "m_d.jsonl")
        assert record["correct"] is correct and record["prediction"].count("<image_start>") == 1
        assert json.loads((out / "config.json").read_text())["image_skips"] == len(flags) // 2
        assert ("one text round, no image skip" in (out / "results.md").read_text()) is correct


def test_teacher_context_system(sharp, tmp_path):
    """`NAME=DIR:teacher_context`: text-only decoding after the privileged teacher context with the data's
    VTs, one text round, recomputed here from the backend directly."""
    sharp.save(tmp_path / "m")
    out = tmp_path / "eval"
    argv = [
        "eval",
        "--system",
        f"t={tmp_path / 'm'}:teacher_context",
        "--system",
        f"s={tmp_path / 'm'}:text",
        "--n",
        "8",
        "--sizes",
        "3",
        "5",
        "--seed",
        "5",
        "--out",
        str(out),
        *FAST,
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["t"]["mode"] == "teacher_context" and results["t"]["tasks"]["maze"]["n"] == 8
    samples = mazes(8, seed=5, sizes=(3, 5))
    contexts = [sharp.build_context(s, role="teacher", vt_mode="data") for s in samples]
    expected = [c.text for c in sharp.sample(contexts, max_new_tokens=6, temperature=0.0, max_image_skips=0)]
    teacher = read_jsonl(out / "records" / "t_maze.jsonl")
    assert [r["prediction"] for r in teacher] == expected and {r["mode"] for r in teacher} == {"teacher_context"}
    student = [r["prediction"] for r in read_jsonl(out / "records" / "s_maze.jsonl")]
    assert student != expected  # the VTs in the context change the answers
    check_summary(results["t"]["tasks"]["maze"], teacher)


def test_validation_decodes_one_text_round_by_default(monkeypatch):
    """SFT and Visual-OPSD validation and `visual-opsd eval` default to no image skip, as the reference;
    the training rollouts keep their own `rollout.max_image_skips`."""
    import inspect

    from visual_opsd import train
    from visual_opsd.sft import EvalConfig

    assert inspect.signature(predict).parameters["image_skips"].default == 0
    assert EvalConfig().image_skips == 0 and ev.EvaluateConfig().image_skips == 0
    assert train.TrainEvalConfig().image_skips == 0 and train.RolloutConfig().max_image_skips == 1
    seen = []
    monkeypatch.setattr(train, "predict", lambda *a, **k: seen.append(k["image_skips"]) or ["x"] * len(a[1]))
    engine = SimpleNamespace(layout=SimpleNamespace(gather=lambda: None))
    dist = SimpleNamespace(rank=0, world=1, sum=lambda x: x, is_main=True)
    for skips in (0, 2):
        cfg = SimpleNamespace(eval=train.TrainEvalConfig(image_skips=skips), seed=0)
        run = SimpleNamespace(
            cfg=cfg,
            dist=dist,
            engine=engine,
            backend=None,
            task=get_task("maze"),
            val=mazes(2),
            state=train.TrainState(best=2.0),
            out=Path("unused"),
        )
        train.validate(run, step=1)
    assert seen == [0, 2]


@pytest.mark.slow  # two processes under accelerate launch
def test_eval_under_accelerate_launch_equals_one_process(sharp, tmp_path):
    """The processes share the accuracy pass (greedy, so the answers are the same as one process's);
    rank 0 writes the same results and records."""
    from helpers import launch

    sharp_folder = tmp_path / "sharp"
    sharp.save(sharp_folder)  # its answers differ from maze to maze: a mix-up between ranks would show
    common = ["--system", f"m={sharp_folder}:text", "--n", "6", "--sizes", "3", "4", *FAST]
    assert main(["eval", *common, "--out", str(tmp_path / "one")]) == 0
    launch(2, [*common, "--out", str(tmp_path / "two")], command="eval")
    one, two = (json.loads((tmp_path / d / "results.json").read_text())["m"] for d in ("one", "two"))
    assert two["tasks"]["maze"]["n"] == 6 and two["accuracy"] == one["accuracy"]
    keep = ("id", "prediction", "correct", "tokens")
    rows = [[{k: r[k] for k in keep} for r in read_jsonl(tmp_path / d / "records" / "m_maze.jsonl")]
            for d in ("one", "two")]
    assert rows[0] == rows[1] and len({r["prediction"] for r in rows[0]}) > 1
    assert "Decoding shared by 2 processes" in (tmp_path / "two" / "results.md").read_text()
