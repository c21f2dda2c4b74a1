"""bench/tasks.py: the seven labeling tasks' loaders and their fixed dev/test splits (no models)."""
import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import tasks  # noqa: E402

NEW = ("hellaswag", "winogrande", "openbookqa", "banking77")


@pytest.mark.parametrize("task", tasks.LABEL_TASKS)
def test_splits_are_fixed_disjoint_and_sized(task):
    dev, test = tasks.load_split(task, "dev"), tasks.load_split(task, "test")
    assert len(dev) == tasks.DEV_SIZE == 200
    want = {"openbookqa": 300, "banking77": tasks.TEST_CAP["banking77"]}.get(task, 500)
    assert len(test) == want
    assert not {r["id"] for r in dev} & {r["id"] for r in test}
    assert len({r["id"] for r in test}) == len(test)
    # dev = positions 200-399 of the sha256 order, test = 0-199 then 400-...
    order = sorted(hashlib.sha256(r["id"].encode()).hexdigest() for r in dev + test)
    key = [hashlib.sha256(r["id"].encode()).hexdigest() for r in test[:200] + dev + test[200:]]
    assert key == order
    assert [r["id"] for r in tasks.load_split(task, "test", 7)] == [r["id"] for r in test[:7]]
    for r in dev + test:
        assert r["prompt"].strip() and r["gold"] in r["choices"] and len(set(r["choices"])) == len(r["choices"])


def test_the_earlier_subsets_lie_inside_the_same_splits():
    for task in ("arc_challenge", "boolq"):
        assert [r["id"] for r in tasks.load(task, 100)] == [r["id"] for r in tasks.load_split(task, "test", 100)]
        assert [r["id"] for r in tasks.load(task, 200, split="dev", n_dev=50)] == \
            [r["id"] for r in tasks.load_split(task, "dev", 50)]


def test_holdout_is_disjoint_from_dev_and_test():
    ids = {s: {r["id"] for r in tasks.load_split("banking77", s)} for s in tasks.ALL_SPLITS}
    assert len(ids["holdout"]) == len(ids["holdout2"]) == tasks.TEST_CAP["banking77"]
    assert not ids["holdout"] & (ids["dev"] | ids["test"]) and not ids["holdout2"] & (ids["dev"] | ids["test"] | ids["holdout"])


def test_split_positions_and_errors():
    assert tasks.split_positions(500, "test") == list(range(200)) + list(range(400, 500))
    assert tasks.split_positions(2000, "test", 300) == list(range(200)) + list(range(400, 500))
    assert tasks.split_positions(2000, "dev") == list(range(200, 400))
    assert tasks.split_positions(3080, "holdout", 300) == list(range(500, 800))  # BANKING77's
    assert tasks.split_positions(1000, "holdout") == list(range(700, 1000))  # fewer where the task runs out
    assert tasks.split_positions(3080, "holdout2", 300) == list(range(800, 1100))
    with pytest.raises(ValueError, match="no holdout split"):
        tasks.split_positions(500, "holdout")  # OpenBookQA: test takes every item after dev
    with pytest.raises(ValueError, match="no holdout2 split"):
        tasks.split_positions(1000, "holdout2")
    with pytest.raises(ValueError, match="split must be one of"):
        tasks.split_positions(2000, "train")
    with pytest.raises(ValueError, match="at least 400 items"):
        tasks.split_positions(399, "dev")
    with pytest.raises(ValueError, match="task must be one of"):
        tasks.load_split("nope", "dev")


def test_new_task_formats():
    hs = tasks.load_split("hellaswag", "dev", 1)[0]
    assert hs["prompt"].startswith("Context: ") and hs["prompt"].endswith("Which ending continues the context best?")
    assert len(hs["choices"]) == 4
    wg = tasks.load_split("winogrande", "dev", 1)[0]
    assert "_" in wg["prompt"] and wg["prompt"].endswith(f"{wg['choices'][0]} or {wg['choices'][1]}?")
    assert len(wg["choices"]) == 2
    ob = tasks.load_split("openbookqa", "test", 1)[0]
    assert ob["prompt"].startswith("Question: ") and len(ob["choices"]) == 4
    bk = tasks.load_split("banking77", "dev", 3)
    assert all(r["choices"] == tasks.banking77_intents() for r in bk) and len(bk[0]["choices"]) == 77
    assert all(r["prompt"].startswith("Customer message: ") for r in bk)


def test_intents_read_as_text_and_map_the_gold_back():
    assert tasks.intent_text("Refund_not_showing_up") == "refund not showing up"
    assert tasks.intent_text("reverted_card_payment?") == "reverted card payment"
    assert tasks.intent_text("atm_support") == "ATM support"
    assert tasks.intent_text("apple_pay_or_google_pay") == "Apple Pay or Google Pay"
    intents = tasks.banking77_intents()
    assert len(intents) == len(set(intents)) == 77 and all("_" not in i for i in intents)
    # every gold of both splits is one of the readable intents
    assert all(r["gold"] in intents for s in tasks.SPLITS for r in tasks.load_split("banking77", s))


@pytest.mark.parametrize("task,test_size", [("halueval_qa", 500), ("ifeval", 341)])
def test_generation_tasks_have_disjoint_splits_and_a_gold(task, test_size):
    dev, test = tasks.load_split(task, "dev"), tasks.load_split(task, "test")
    assert len(dev) == 200 and len(test) == test_size
    assert not {r["id"] for r in dev} & {r["id"] for r in test}
    for r in dev[:20] + test[:20]:
        assert r["prompt"].strip() and "choices" not in r and r["gold"]
    qa = tasks.load_split("halueval_qa", "dev", 1)[0]
    assert qa["prompt"].startswith("Passage: ") and qa["prompt"].endswith("\nAnswer:")


def test_qa_scores_follow_squad_normalisation():
    assert tasks.qa_scores("Answer: The Delhi.\nQuestion: more", "Delhi") == (1.0, 1.0)
    em, f1 = tasks.qa_scores("in New Delhi", "Delhi")
    assert em == 0.0 and f1 == pytest.approx(0.5)
    assert tasks.qa_scores("\n\n  Paris, France", "paris") == (0.0, pytest.approx(2 / 3))
    assert tasks.qa_scores("", "Paris") == (0.0, 0.0)
    assert tasks.qa_scores(None, "Paris") == (0.0, 0.0)
    assert tasks.qa_answer("\nAnswer:  yes\nno") == "yes"


def test_ifeval_pass_needs_every_instruction():
    gold = {"instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"], "kwargs": [{}, {}],
            "prompt": "p"}
    assert tasks.ifeval_pass(gold, "plain lower words")
    assert not tasks.ifeval_pass(gold, "plain, lower words")
    assert not tasks.ifeval_pass(gold, "Plain lower words")
    repeat = {"instruction_id_list": ["combination:repeat_prompt"], "kwargs": [{}],
              "prompt": "Say hi. Then more."}
    assert tasks.ifeval_pass(repeat, "Say hi. Then more. Hi!")
    assert not tasks.ifeval_pass(repeat, "Hi!")
