"""engine.Classifier against plain, uncached full-sequence forwards (the brute-force reference)."""

from __future__ import annotations

import copy
import json
import math
import threading

import pytest
import torch
import yaml

from qwen_ft.encoding import PromptEncoder
from qwen_ft.errors import UserError
from qwen_ft.inference.engine import Classifier
from qwen_ft.tasks import CategoryTask, MultipleChoiceTask
from tests.conftest import full_logprobs

QUESTIONS = ["Why is the sky blue?", "What is a contract?", "x", "Define entropy " * 5,
             "Integrate x dx from 0 to 1.", "What do ribosomes do?", "Who wrote the Iliad?"]
MC_ROWS = [
    {"question": "Where do you keep milk cold?", "choices": ["oven", "fridge", "kitchen drawer", "car", "roof"],
     "label": "B"},
    {"question": "What do bees make?", "choices": ["honey", "silk", "wax paper", "honey cake", "milk"], "label": "A"},
    {"question": "Pick the colour of grass.", "choices": ["green", "blue", "red", "green", "pink"], "label": "A"},
    {"question": "Which is a prime?", "choices": ["4", "6", "7"], "label": "C"},
]


def encoders(tok) -> dict[str, PromptEncoder]:
    return {
        "unique first tokens": PromptEncoder(tok, CategoryTask.create(["biology", "computer science", "law", "math"]),
                                             256),
        "shared first token": PromptEncoder(tok, CategoryTask.create(["computer science", "computer vision",
                                                                      "computer networks", "law"]), 256),
        "mc letters": PromptEncoder(tok, MultipleChoiceTask.create(MC_ROWS), 256),
        "mc text": PromptEncoder(tok, MultipleChoiceTask.create(MC_ROWS, answer_format="text"), 256),
    }


def rows_for(enc: PromptEncoder) -> list[dict]:
    if enc.task.name == "multiple_choice":
        return MC_ROWS
    return [{"question": q, "label": enc.task.labels[i % len(enc.task.labels)]} for i, q in enumerate(QUESTIONS)]


def brute_greedy(model, prompt: list[int], seqs: list[list[int]]) -> tuple[int, list[float]]:
    """Greedy decoding over the answers' trie with full forwards; and the first-token probabilities."""
    cands, done, first = list(range(len(seqs))), [], None
    while True:
        logp = full_logprobs(model, prompt + done)[-1]
        k = len(done)
        if first is None:
            firsts = sorted({s[0] for s in seqs})
            p = torch.softmax(logp[firsts].double(), -1)
            first = [float(p[firsts.index(s[0])]) for s in seqs]
        if len(cands) == 1:
            return cands[0], first
        tok = max({seqs[j][k] for j in cands}, key=lambda t: float(logp[t]))
        cands = [j for j in cands if seqs[j][k] == tok]
        done.append(tok)


def brute_logprob(model, prompt: list[int], seq: list[int]) -> float:
    logp = full_logprobs(model, prompt + seq)
    return sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(seq))


@pytest.fixture(scope="module")
def classifiers(tiny_model, qwen_tok) -> dict[str, Classifier]:
    return {name: Classifier(tiny_model, enc) for name, enc in encoders(qwen_tok).items()}


@pytest.mark.parametrize("name", ["unique first tokens", "shared first token", "mc letters", "mc text"])
def test_constrained_equals_brute_force_greedy(classifiers, tiny_model, name):
    clf = classifiers[name]
    rows = rows_for(clf.encoder)
    results, stats = clf.classify(rows, batch_size=3, top_k=10)
    for row, res in zip(rows, results):
        labels, seqs = clf.encoder.answer_options(row)
        best, first = brute_greedy(tiny_model, clf.encoder.prompt_ids(row), seqs)
        assert res["valid"] and res["pred"] == labels[best]
        assert res["probability"] == pytest.approx(first[best], abs=1e-4)
        assert res["top"][0][0] == res["pred"] and len(res["top"]) == len(labels)
        for lab, p in res["top"]:
            assert p == pytest.approx(first[labels.index(lab)], abs=1e-4)
    # the instruction runs once (at load), not once per row
    assert stats["rows"] == len(rows) and stats["computed_tokens"] < stats["prompt_tokens"]


@pytest.mark.parametrize("name", ["unique first tokens", "shared first token", "mc letters", "mc text"])
@pytest.mark.parametrize("normalize", ["none", "token", "char"])
def test_exact_equals_hand_computed_normalized_logprobs(classifiers, tiny_model, name, normalize):
    clf = classifiers[name]
    rows = rows_for(clf.encoder)
    results, stats = clf.classify(rows, decode="exact", normalize=normalize, batch_size=3, top_k=10)
    assert stats["normalize"] == normalize and stats["decode"] == "exact"
    for row, res in zip(rows, results):
        labels, seqs = clf.encoder.answer_options(row)
        prompt = clf.encoder.prompt_ids(row)
        scores = []
        for lab, seq in zip(labels, seqs):
            lp = brute_logprob(tiny_model, prompt, seq)
            div = {"none": 1, "token": len(seq), "char": len(clf.task.answer(row, lab))}[normalize]
            scores.append(lp / div)
        z = max(scores)
        probs = [math.exp(s - z) for s in scores]
        probs = [p / sum(probs) for p in probs]
        got = dict(map(tuple, res["top"]))
        assert set(got) == set(labels)
        for lab, p in zip(labels, probs):
            assert got[lab] == pytest.approx(p, abs=1e-4)
        assert res["pred"] == labels[max(range(len(labels)), key=probs.__getitem__)]
        assert res["probability"] == pytest.approx(max(probs), abs=1e-4)


def test_batching_and_top_k_do_not_change_predictions(classifiers):
    clf = classifiers["unique first tokens"]
    rows = rows_for(clf.encoder)
    for decode in ("constrained", "exact"):
        one, _ = clf.classify(rows, decode=decode, batch_size=1)
        many, _ = clf.classify(rows, decode=decode, batch_size=16, top_k=2)
        assert [r["pred"] for r in one] == [r["pred"] for r in many]
        assert all(len(r["top"]) == 1 for r in one) and all(len(r["top"]) == 2 for r in many)
        for a, b in zip(one, many):
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-4)


def test_free_decoding_is_valid_only_on_an_exact_answer(classifiers):
    from tests.conftest import ForcedAnswer

    clf = classifiers["unique first tokens"]
    rows = rows_for(clf.encoder)
    results, stats = clf.classify(rows, decode="free", batch_size=4)
    for res in results:  # the untrained model writes what it writes: a label only when it wrote one exactly
        assert isinstance(res["output"], str) and res["probability"] is None
        assert res["valid"] == (res["pred"] is not None)
        assert res["pred"] is None or res["output"].strip().rstrip(".").lower() == res["pred"]
    assert stats["computed_tokens"] > 0
    # the model made to write a label, the same label in another case with a period, or a near miss: free
    # decoding returns that label and is valid, exactly when the text is the label
    after = clf.encoder.prompt_ids(rows[0])[-1]  # every prompt ends with the assistant turn opened
    assert all(clf.encoder.prompt_ids(r)[-1] == after for r in rows)
    for written, label in (("law", "law"), ("Law.", "law"), ("laws", None)):
        answer = clf.encoder.answer_ids(written)
        assert len(answer) <= clf.encoder.answer_len(rows[0]) + 2, (written, answer)  # within the token budget
        with ForcedAnswer(clf.model, after, answer):
            forced, _ = clf.classify(rows, decode="free", batch_size=4)
        for res in forced:
            assert res["output"] == written, (written, res)
            assert res["pred"] == label and res["valid"] == (label is not None), (written, res)
    # text answers: the choice's text maps back to its letter (B, not the first letter)
    mc = classifiers["mc text"]
    answer = mc.encoder.answer_ids("fridge")
    assert len(answer) <= mc.encoder.answer_len(MC_ROWS[0]) + 2
    with ForcedAnswer(mc.model, mc.encoder.prompt_ids(MC_ROWS[0])[-1], answer):
        (res,), _ = mc.classify(MC_ROWS[:1], decode="free")
    assert res["output"] == "fridge" and res["pred"] == "B" and res["valid"]


def test_stats_are_returned_not_kept_and_concurrent_calls_agree(classifiers):
    clf = classifiers["mc text"]
    before = {k: v for k, v in vars(clf).items() if isinstance(v, (int, float, str, bool))}
    ref, stats = clf.classify(MC_ROWS, decode="exact", batch_size=2)
    out: dict[int, list] = {}

    def call(i):
        out[i] = clf.classify(MC_ROWS[i % 4:] + MC_ROWS[: i % 4], decode="exact", batch_size=2)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (res, st) in out.items():
        rotated = ref[i % 4:] + ref[: i % 4]
        assert [r["pred"] for r in res] == [r["pred"] for r in rotated]
        assert st["prompt_tokens"] == stats["prompt_tokens"]
    assert {k: v for k, v in vars(clf).items() if isinstance(v, (int, float, str, bool))} == before


def test_user_mistakes_are_user_errors(classifiers, qwen_tok, tiny_model):
    clf = classifiers["mc letters"]
    eight = {"question": "q", "choices": list("abcdefgh")}
    with pytest.raises(UserError, match="answers 2 to 5 choices.*1 row\\(s\\) with 8 choices"):
        clf.classify([MC_ROWS[0], eight])
    with pytest.raises(UserError, match="--normalize char applies to --decode exact"):
        clf.classify(MC_ROWS, normalize="char")
    with pytest.raises(UserError, match="decode must be one of"):
        clf.classify(MC_ROWS, decode="beam")
    with pytest.raises(UserError, match="multiple-choice input must be JSON"):
        clf.row("just text")
    assert clf.row('{"question": "q", "choices": ["a", 2]}') == {"question": "q", "choices": ["a", "2"]}
    enc = copy.copy(encoders(qwen_tok)["unique first tokens"])
    enc.ends_answers = False  # answers without an end-of-turn token: only exact scoring is defined
    open_ended = Classifier(tiny_model, enc)
    for decode in ("constrained", "free"):
        with pytest.raises(UserError, match="Use --decode exact"):
            open_ended.classify([{"question": "q"}], decode=decode)


def test_evaluate_report_schema(classifiers):
    clf = classifiers["mc letters"]
    report, preds = clf.evaluate(MC_ROWS, decode="exact", normalize="token")
    for key in ("n", "accuracy", "accuracy_ci95", "macro_f1", "weighted_f1", "valid_pct", "per_label", "decode",
                "normalize", "chance", "seconds", "samples_per_s", "prompt_tokens", "computed_tokens", "precision"):
        assert key in report, key
    assert report["chance"] == pytest.approx((3 * 1 / 5 + 1 / 3) / 4)
    assert report["normalize"] == "token" and report["n"] == 4
    assert [p["label"] for p in preds] == [r["label"] for r in MC_ROWS]
    assert report["accuracy"] == sum(p["correct"] for p in preds) / 4


def test_load_run_baseline_merged_and_remote_code(tiny_run, tmp_path):
    from qwen_ft.merge import merge_run
    from qwen_ft.runs import RunDir

    rows = RunDir(tiny_run).split("validation")
    clf = Classifier.load(tiny_run, precision="fp32")
    assert clf.labels == json.loads((tiny_run / "label_mapping.json").read_text())["labels"]
    trained, _ = clf.classify(rows, decode="exact")
    base, _ = Classifier.load(tiny_run, precision="fp32", adapter=False).classify(rows, decode="exact")
    assert [r["top"] for r in trained] != [r["top"] for r in base]  # the adapter changes the scores

    merged_dir = tmp_path / "merged"
    merge_run(tiny_run, merged_dir, dtype="fp32")
    merged, _ = Classifier.load(merged_dir, precision="fp32").classify(rows, decode="exact")
    assert [r["pred"] for r in merged] == [r["pred"] for r in trained]
    for a, b in zip(merged, trained):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-4)

    remote = tmp_path / "remote"
    import shutil

    shutil.copytree(tiny_run, remote)
    cfg = yaml.safe_load((remote / "config.yaml").read_text())
    cfg["model"]["trust_remote_code"] = True
    (remote / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match="Pass --trust-remote-code"):
        Classifier.load(remote, precision="fp32")


def test_run_folder_label_mapping_reads_as_semantic_router_reads_it(tiny_run):
    """vllm-project/semantic-router (candle-binding qwen3_multi_lora_classifier.rs) takes the categories from
    id2label in id order and replaces {question} in instruction_template; our readers ignore those keys."""
    mapping = json.loads((tiny_run / "label_mapping.json").read_text())
    categories = [label for _, label in sorted(mapping["id2label"].items(), key=lambda kv: int(kv[0]))]
    assert categories == mapping["labels"]
    assert mapping["label2id"] == {label: i for i, label in enumerate(categories)}
    from qwen_ft.tasks import Task

    task = Task.from_mapping(mapping)
    prompt = mapping["instruction_template"].replace("{question}", "What is a tort?")
    assert prompt == f"{task.system_message()}\n\nWhat is a tort?" and "{" not in prompt
    assert task.extra == {} and Task.from_mapping(task.to_mapping()).to_mapping() == task.to_mapping()


def test_near_ties_are_decided_alone_so_labels_do_not_depend_on_the_batch(tiny_model, qwen_tok):
    """bf16 scores move with the batch (shape, padding); a row whose two best answers are within the engine's
    tie margin is scored again alone, so its label is the one it gets alone, in any batch."""
    enc = encoders(qwen_tok)["unique first tokens"]
    clf = Classifier(copy.deepcopy(tiny_model).to(torch.bfloat16), enc, precision="bf16")
    assert clf.tie_margin > 0
    rows = [{"question": q + suffix} for q in QUESTIONS for suffix in ("", " Explain briefly.")]
    alone = [clf.classify([r])[0][0] for r in rows]
    clf.tie_margin = 0.0
    raw, _ = clf.classify(rows, batch_size=5)  # the batched scores, nothing rescored
    from qwen_ft.inference.decoding import _margin

    close = [i for i, r in enumerate(raw) if _margin(r) < 0.5]
    assert close  # a tiny random model has small margins: some rows must be rescored
    clf.tie_margin = 0.5
    for batch_size, order in ((5, rows), (16, rows[::-1]), (3, rows[1::2] + rows[::2])):
        got, stats = clf.classify(order, batch_size=batch_size)
        expected = [alone[rows.index(r)] for r in order]
        for g, a in zip(got, expected):
            if _margin(a) < 0.25:  # well inside the margin: decided alone, exactly the alone result
                assert g["pred"] == a["pred"] and g["probability"] == a["probability"]
        assert stats["rescored_alone"] >= 1
    got, stats = clf.classify(rows, batch_size=5)
    assert stats["rescored_alone"] == len(close)
    for i in close:
        assert got[i] == alone[i]


def test_packed_batches_equal_each_row_alone(classifiers, tiny_model):
    """Rows of very different lengths in one batch run packed (one row, no padding, a block-diagonal mask over
    the shared instruction cache): the answers and probabilities of full forwards of each row alone."""
    from qwen_ft.inference.decoding import PACK_ABOVE_PADDING

    clf = classifiers["unique first tokens"]
    rows = [{"question": q} for q in ["x", "Define entropy " * 12, "Why?", "What is a contract in law, briefly?"]]
    suffix_lens = [len(clf.encoder.prompt_ids(r)) - len(clf._prefix) for r in rows]
    assert len(rows) * max(suffix_lens) > PACK_ABOVE_PADDING * sum(suffix_lens)  # padding would waste: it packs
    results, stats = clf.classify(rows, batch_size=16, top_k=4)
    assert stats["computed_tokens"] == sum(suffix_lens)  # not one pad token computed (padded: 4 x the longest)
    for row, res in zip(rows, results):
        labels, seqs = clf.encoder.answer_options(row)
        best, first = brute_greedy(tiny_model, clf.encoder.prompt_ids(row), seqs)
        assert res["pred"] == labels[best]
        for lab, p in res["top"]:
            assert p == pytest.approx(first[labels.index(lab)], abs=1e-5)


def test_packed_plans_cap_real_tokens_per_pack(classifiers):
    """A pack scores every token against the whole pack: packed batches hold at most max_pack_tokens real
    tokens (a row longer than that alone), padded ones keep the larger padded cap; every row once."""
    clf = classifiers["unique first tokens"]
    lengths = [30, 200, 90, 400, 700, 60, 120, 300, 15, 250]
    prompts = [[1] * (n + 5) for n in lengths]
    packed = clf.plan(prompts, 5, 16, packed=True)
    assert sorted(i for b in packed for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= clf.max_pack_tokens or len(b) == 1 for b in packed)
    assert len(packed) > 1 and clf.max_pack_tokens < clf.max_batch_tokens
    padded = clf.plan(prompts, 5, 16)
    assert all(len(b) * max(lengths[i] for i in b) <= clf.max_batch_tokens or len(b) == 1 for b in padded)


def test_packed_pass_without_a_prefix_equals_full_forwards(tiny_model):
    from qwen_ft.inference.kernels import Counts, packed_pass

    torch.manual_seed(0)
    seqs = [torch.randint(5, 200, (n,)).tolist() for n in (1, 9, 3, 17)]
    logits = packed_pass(tiny_model, seqs, 0, None, "cpu", Counts())
    assert logits.shape == (len(seqs), tiny_model.config.vocab_size)
    for k, s in enumerate(seqs):
        assert torch.allclose(torch.log_softmax(logits[k], -1), full_logprobs(tiny_model, s)[-1], atol=1e-5)


def test_packing_only_where_the_custom_mask_is_honoured(tiny_model):
    from types import SimpleNamespace

    from qwen_ft.inference.decoding import _can_pack

    cpu = torch.device("cpu")
    # loaded with the default attention: the CPU matmul attention, which honours the mask as sdpa does
    assert tiny_model.config._attn_implementation == "qwen_ft_cpu" and _can_pack(tiny_model, cpu)

    def model(**config):
        return SimpleNamespace(config=SimpleNamespace(**{"_attn_implementation": "sdpa", **config}))

    assert _can_pack(model(), cpu) and _can_pack(model(layer_types=["full_attention"] * 2), cpu)
    assert not _can_pack(model(_attn_implementation="eager"), cpu)  # would add a bool mask, not apply it
    assert not _can_pack(model(_attn_implementation="flash_attention_2"), cpu)
    assert not _can_pack(model(sliding_window=4096), cpu)
    assert not _can_pack(model(layer_types=["full_attention", "linear_attention"]), cpu)
    assert not _can_pack(model(), torch.device("cuda"))  # measured on CPU only
