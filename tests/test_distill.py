"""Distillation in upcycle finetune: the chunked KL, state matching, teachers, logging, resume, processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_dense
from test_finetune import final_weights, write_recipe

from upcycle.convert import convert_checkpoint
from upcycle.errors import UpcycleError
from upcycle.methods.moh import MoHOptions
from upcycle.train.distill import _kl_chunk, chunked_kl, resolve_reference, state_matching
from upcycle.train.finetune import run_finetune
from upcycle.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def moh(tmp_path, calibration_file):
    dense = build_dense(tmp_path / "dense")
    convert_checkpoint(str(dense), tmp_path / "moh", "moh", MoHOptions(active_heads=0.5, shared_heads="0.25"))
    return tmp_path, dense, calibration_file


def distill_recipe(tmp_path: Path, data: Path, **changes) -> Path:
    return write_recipe(tmp_path, tmp_path / "moh", data, **({"teacher": "source", "losses__distill": 1.0} | changes))


# ---- the KL ---------------------------------------------------------------------------------


def test_chunked_kl_equals_unchunked():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    logits = torch.randn(3, 7, 50, requires_grad=True)
    hidden = torch.randn(3, 7, 16)
    reference = chunked_kl(logits, hidden, head, temperature=2.0, chunk_tokens=1000)  # one chunk
    (grad_reference,) = torch.autograd.grad(reference, logits)
    for chunk in (1, 4, 5):
        value = chunked_kl(logits, hidden, head, temperature=2.0, chunk_tokens=chunk)
        (grad,) = torch.autograd.grad(value, logits)
        torch.testing.assert_close(value, reference, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, grad_reference, rtol=1e-5, atol=1e-8)
    # against the textbook formula: T^2 * mean_positions sum_v p_t (log p_t - log p_s)
    teacher = torch.log_softmax(head(hidden) / 2.0, -1)
    student = torch.log_softmax(logits / 2.0, -1)
    expected = 4.0 * (teacher.exp() * (teacher - student)).sum(-1).mean()
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-6)


def test_kl_of_a_model_with_itself_is_zero_with_zero_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(2, 9, 16)
    logits = head(hidden).detach().requires_grad_(True)
    value = chunked_kl(logits, hidden, head, chunk_tokens=4)
    (grad,) = torch.autograd.grad(value, logits)
    assert abs(value.item()) < 1e-6
    assert float(grad.abs().max()) < 1e-7


def test_chunked_kl_keeps_no_vocabulary_sized_tensor_for_the_backward():
    """What the KL graph saves for the backward pass: nothing of [positions, vocab] beyond the inputs' own storage
    when chunked (each chunk is recomputed); the unchunked formula saves several [N, V] tensors."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 400, bias=False)
    logits = torch.randn(64, 400, requires_grad=True)
    hidden = torch.randn(64, 8)

    inputs = {t.untyped_storage().data_ptr() for t in (logits, hidden, head.weight)}

    def saved_bytes(function) -> int:
        """Bytes of the storages the graph keeps for the backward pass, other than the inputs' own."""
        storages = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in inputs:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            function()
        return sum(storages.values())

    full = logits.numel() * 4
    assert saved_bytes(lambda: _kl_chunk(logits, hidden, head.weight, None, 1.0)) >= full
    assert saved_bytes(lambda: chunked_kl(logits, hidden, head, chunk_tokens=8)) < full / 4


def test_state_matching_is_relative_and_zero_on_equal_states():
    states = [torch.randn(2, 5, 8), 100 * torch.randn(2, 5, 8)]
    assert float(state_matching(states, states)) == 0.0
    moved = [s * 1.1 for s in states]  # 10% off in every layer, whatever its scale
    torch.testing.assert_close(state_matching(moved, states), torch.tensor(0.01), rtol=1e-4, atol=0)


# ---- the recipe -----------------------------------------------------------------------------


def test_distillation_keys_validate(moh):
    tmp_path, _, data = moh
    for changes, needle in [
        ({"losses__distill": 1.0}, "need a teacher"),
        ({"teacher": "source"}, "teacher is set but"),
        ({"losses__lm": 0.0}, "nothing would train"),
        ({"teacher": "source", "losses__distill": 1.0, "losses__distill_temperature": 0}, "distill_temperature"),
    ]:
        path = write_recipe(tmp_path, tmp_path / "moh", data, **changes)
        with pytest.raises(UpcycleError) as error:
            load_recipe(str(path))
        assert needle in str(error.value) and "\n" not in str(error.value)


def test_teacher_source_resolves_for_every_method(tmp_path, calibration_file):
    from upcycle.methods.bam import BAMOptions
    from upcycle.methods.gqa import GQAOptions
    from upcycle.methods.mhe import MHEOptions
    from upcycle.methods.prune_heads import PruneHeadsOptions

    dense = build_dense(tmp_path / "dense")
    branch = build_dense(tmp_path / "branch", seed=1)
    outputs = {
        "moh": MoHOptions(),
        "prune-heads": PruneHeadsOptions(ratio=0.5, importance="random", uniform=True),
        "gqa": GQAOptions(kv_heads=1),
        "mhe": MHEOptions(),
        "bam": BAMOptions(experts=[str(branch)]),  # the seed is the source
    }
    for method, options in outputs.items():
        out = tmp_path / method
        convert_checkpoint(str(dense), out, method, options)
        assert resolve_reference("source", out, "teacher") == dense, method
    with pytest.raises(UpcycleError, match="records no source model"):
        resolve_reference("source", dense, "teacher")


def test_mismatched_tokenizer_is_one_line(moh):
    tmp_path, _, data = moh
    other = build_dense(tmp_path / "other")
    vocab = json.loads((other / "tokenizer.json").read_text())
    vocab["model"]["vocab"] = {("x" + word if i > 10 else word): i for word, i in vocab["model"]["vocab"].items()}
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    path = write_recipe(tmp_path, tmp_path / "moh", data, teacher=str(other), losses__distill=1.0)
    with pytest.raises(UpcycleError) as error:
        run_finetune(load_recipe(str(path)))
    assert "another tokenizer" in str(error.value) and "\n" not in str(error.value)


# ---- training -------------------------------------------------------------------------------


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_distillation_alone_moves_the_student_towards_its_teacher(moh):
    tmp_path, _, data = moh
    teacher = build_dense(tmp_path / "teacher", seed=0, initializer_range=0.3)  # peaked distributions: a KL to learn
    student = build_dense(tmp_path / "student", seed=1, initializer_range=0.3)
    path = write_recipe(
        tmp_path,
        student,
        data,
        teacher=str(teacher),
        losses__distill=1.0,
        losses__lm=0.0,
        training__steps=16,
        training__lr=1e-2,
        training__min_lr=1e-3,
        training__eval_every=16,
    )
    final = run_finetune(load_recipe(str(path)))
    card = (final / "README.md").read_text()
    assert "Distilled from `teacher`: the objective is 1 x KL to the teacher (T = 1)." in card
    metrics = [m for m in read_metrics(tmp_path / "run") if m["step"] > 0]
    assert all({"loss", "lm_loss", "distill_loss", "aux_loss"} <= set(m) for m in metrics)
    first, last = metrics[0]["distill_loss"], metrics[-1]["distill_loss"]
    assert last < 0.8 * first, (first, last)
    curve = [m for m in read_metrics(tmp_path / "run") if "recovery" in m]  # the teacher is the reference
    assert [m["step"] for m in curve] == [0, 16] and curve[-1]["recovery"]["held-out"] < curve[0]["recovery"][
        "held-out"
    ]


def matching_error(student: Path, teacher: Path, ids: torch.Tensor, target: str) -> float:
    from transformers import AutoModelForCausalLM

    from upcycle.train.distill import AttentionOutputs, Teacher

    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    _, expected = Teacher(teacher, torch.device("cpu"), torch.float32, model.config.vocab_size).states(ids, target)
    with torch.no_grad(), AttentionOutputs(model) as recorder:
        out = model(input_ids=ids, output_hidden_states=True)
    got = recorder.take() if target == "attention_outputs" else list(out.hidden_states[1:])
    return float(state_matching(got, expected))


def test_hidden_state_and_attention_output_matching_train_and_log(moh):
    tmp_path, dense, data = moh
    ids = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(5))
    for target in ("hidden_states", "attention_outputs"):
        path = distill_recipe(
            tmp_path,
            data,
            losses__lm=0.0,
            losses__distill=0.0,
            losses__distill_hidden=1.0,
            losses__load_balance=0.0,
            losses__distill_hidden_on=target,
            training__steps=16,
            training__lr=5e-4,
            training__eval_every=0,
            output=str(tmp_path / target),
        )
        run_finetune(load_recipe(str(path)))
        metrics = read_metrics(tmp_path / target)
        assert all("hidden_loss" in m and "lm_loss" in m for m in metrics) and len(metrics) == 16
        before = matching_error(tmp_path / "moh", dense, ids, target)
        after = matching_error(tmp_path / target / "final", dense, ids, target)
        assert after < 0.9 * before, (target, before, after)


def test_resume_with_a_teacher_equals_an_uninterrupted_run(moh):
    tmp_path, _, data = moh
    whole = distill_recipe(tmp_path, data, output=str(tmp_path / "whole"), training__save_every=2)
    run_finetune(load_recipe(str(whole)))
    parts = distill_recipe(tmp_path, data, output=str(tmp_path / "parts"), training__save_every=2)
    assert run_finetune(load_recipe(str(parts)), stop_after=2) is None
    run_finetune(load_recipe(str(parts)), resume=True)
    expected, got = final_weights(tmp_path / "whole"), final_weights(tmp_path / "parts")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


@pytest.mark.slow
def test_two_processes_equal_one_with_a_teacher(moh):
    tmp_path, _, data = moh
    one = distill_recipe(tmp_path, data, output=str(tmp_path / "one"), losses__distill_hidden=0.5)
    run_finetune(load_recipe(str(one)))
    two = distill_recipe(tmp_path, data, output=str(tmp_path / "two"), losses__distill_hidden=0.5)
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--main_process_port",
            "29533",
            "-m",
            "upcycle",
            "finetune",
            str(two),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)


# ---- recovery at the end, conversion sections ---------------------------------------------------


def test_finetune_reports_recovery_on_every_validation_corpus(moh):
    tmp_path, dense, data = moh
    documents = data.read_text().split("\n\n")
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("\n\n".join(documents[:5])), second.write_text("\n\n".join(documents[5:10]))
    path = write_recipe(
        tmp_path,
        tmp_path / "moh",
        data,
        compare="source",
        data__validation=[str(first), str(second)],
        data__validation_tokens=64,
    )
    final = run_finetune(load_recipe(str(path)))
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    after, before = evaluation["recovery"]
    assert set(after["corpora"]) == set(before["corpora"]) == {"first.txt", "second.txt"}
    rows = {(r["name"], r["data"]): r["perplexity"] for r in evaluation["results"]}
    for corpus in ("first.txt", "second.txt"):
        assert after["corpora"][corpus]["ratio"] == pytest.approx(
            rows["after tuning", corpus] / rows["reference", corpus]
        )
    assert Path(after["reference"]) == dense
    start = read_metrics(tmp_path / "run")[0]
    assert start["step"] == 0 and set(start["recovery"]) == {"first.txt", "second.txt"}
    assert "Recovery of" in (final / "README.md").read_text()


@pytest.mark.parametrize(
    "section, expected",
    [
        ({"method": "gqa", "kv_heads": 1}, {"num_key_value_heads": 1}),
        ({"method": "prune-heads", "ratio": 0.5, "importance": "random", "uniform": True}, {"num_key_value_heads": 1}),
    ],
)
def test_recipe_convert_sections_of_gqa_and_prune_heads(tmp_path, calibration_file, section, expected):
    from upcycle.train.finetune import prepare_model
    from upcycle.train.loop import process_state

    dense = build_dense(tmp_path / "dense")
    path = write_recipe(tmp_path, dense, calibration_file, convert=section)
    converted = prepare_model(load_recipe(str(path)), process_state())
    config = json.loads((converted / "config.json").read_text())
    assert {key: config[key] for key in expected} == expected
    assert resolve_reference("source", converted, "teacher") == dense
    bad = write_recipe(tmp_path, dense, calibration_file, convert=section | {"kv_head": 2})
    with pytest.raises(UpcycleError, match="'convert.kv_head' is unknown"):
        load_recipe(str(bad))
