"""lorakit.metrics against the reference libraries (rouge-score, sacrebleu, evaluate) on fixed strings."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest

import lorakit
import lorakit.metrics as lm
from lorakit.errors import ConfigError, MissingDependencyError

PREDICTIONS = [
    "The cats were running quickly across the green fields.",
    "Paris is the capital of France.",
    "I am fine, thank you very much.",
    "the lazy dog sleeps",
]
REFERENCES = [
    "A cat runs quickly across the green field.",
    "The capital of France is Paris.",
    "I am fine, thanks a lot.",
    "the quick brown fox jumps over the lazy dog",
]


def test_rouge_equals_rouge_score_with_stemming():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    expected = {key: 0.0 for key in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    for prediction, reference in zip(PREDICTIONS, REFERENCES, strict=True):
        for key, score in scorer.score(reference, prediction).items():
            expected[key] += score.fmeasure / len(PREDICTIONS)
    got = lm.compute(["rouge"], predictions=PREDICTIONS, references=REFERENCES)
    assert got == pytest.approx(expected, abs=1e-12)
    assert set(got) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    # Stemming is on: "cats running" and "cat run" share both unigrams and their bigram.
    assert lm.compute(["rouge"], predictions=["cats running"], references=["cat run"])["rouge2"] == 1.0
    no_stem = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False).score("cat run", "cats running")
    assert no_stem["rouge1"].fmeasure == 0.0


def test_rouge_with_several_references_takes_the_best():
    got = lm.compute(
        ["rouge"], predictions=["the cat sat"], references=[["a dog barked loudly", "the cat sat"]]
    )
    assert got["rouge1"] == 1.0 and got["rougeL"] == 1.0


def test_bleu_and_chrf_equal_sacrebleu_corpus_scores():
    import sacrebleu

    got = lm.compute(["bleu", "chrf"], predictions=PREDICTIONS, references=REFERENCES)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score, abs=1e-12)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score, abs=1e-12)
    assert 0 < got["bleu"] < 100 and 0 < got["chrf"] < 100  # sacrebleu's 0-100 scale
    assert lm.compute(["bleu"], predictions=REFERENCES, references=REFERENCES)["bleu"] == pytest.approx(100.0)


def test_bleu_with_two_reference_streams():
    import sacrebleu

    second = ["Cats run fast across green fields.", "Paris is France's capital.", "Fine, thanks.", "a dog"]
    got = lm.compute(
        ["bleu"], predictions=PREDICTIONS, references=[list(p) for p in zip(REFERENCES, second, strict=True)]
    )
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES, second]).score)
    with pytest.raises(ConfigError, match="same number of references"):
        lm.compute(["bleu"], predictions=["a", "b"], references=[["a"], ["b", "c"]])


def test_exact_match_normalizes_case_space_and_edge_punctuation():
    got = lm.compute(
        ["exact_match"],
        predictions=["  Billing. ", "shipping", "tech  support", "account"],
        references=["billing", "Shipping!", "tech support", "billing"],
    )
    assert got == {"exact_match": 0.75}
    from lorakit.metrics.builtin import ExactMatch

    first_line = ExactMatch(first_line=True, ignore_case=False)
    out = lm.compute(
        [first_line], predictions=["billing\nbecause you were charged", "Billing"], references=["billing"] * 2
    )
    assert out == {"exact_match": 0.5}


def test_accuracy_over_a_label_set():
    from lorakit.metrics.builtin import Accuracy

    predictions = [
        "billing",
        "It goes to shipping.",
        "I think technical, or maybe billing",
        "no idea",
        "account",
    ]
    references = ["billing", "shipping", "technical", "account", "billing"]
    got = lm.compute(["accuracy"], predictions=predictions, references=references)
    assert got == {"accuracy": 0.6, "accuracy_unmatched": 0.2}
    labelled = Accuracy(labels=["billing", "shipping", "technical", "account", "other"])
    assert lm.compute([labelled], predictions=["other"], references=["billing"]) == {
        "accuracy": 0.0,
        "accuracy_unmatched": 0.0,
    }
    with pytest.raises(ConfigError, match=r"references\[0\] is 'refund', which is not in the label set"):
        lm.compute([Accuracy(labels=["billing"])], predictions=["billing"], references=["refund"])


def test_perplexity_is_exp_of_the_mean_token_loss():
    assert lm.compute(["perplexity"], loss=2.0) == {"perplexity": pytest.approx(math.exp(2.0))}
    assert lm.compute(["perplexity"], loss=1e6)["perplexity"] == pytest.approx(math.exp(50.0))  # capped
    with pytest.raises(ConfigError, match="'perplexity' needs loss="):
        lm.compute(["perplexity"], predictions=["a"], references=["a"])


def length_ratio(predictions, references):
    return sum(len(p) for p in predictions) / sum(len(r) for r in references)


def test_custom_callables_and_import_strings():
    got = lm.compute(
        ["exact_match", length_ratio, lambda p, r: {"n_pred": len(p), "nested": {"a": 1}}],
        predictions=["ab", "c"],
        references=["abcd", "c"],
    )
    assert got == {"exact_match": 0.5, "length_ratio": 0.6, "n_pred": 2.0, "nested_a": 1.0}
    assert lm.compute(["test_metrics:length_ratio"], predictions=["ab"], references=["abcd"]) == {
        "length_ratio": 0.5
    }
    assert lm.metric_name(length_ratio) == "test_metrics:length_ratio"
    with pytest.raises(ConfigError, match="returned 'oops'; it must return a number"):
        lm.compute([lambda p, r: "oops"], predictions=["a"], references=["a"])


def test_evaluate_module_loaded_from_a_local_path(tmp_path):
    script = tmp_path / "overlap" / "overlap.py"
    script.parent.mkdir()
    script.write_text(
        textwrap.dedent(
            """
            import datasets
            import evaluate


            class Overlap(evaluate.Metric):
                def _info(self):
                    return evaluate.MetricInfo(
                        description="share of identical pairs",
                        citation="",
                        inputs_description="",
                        features=datasets.Features(
                            {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
                        ),
                    )

                def _compute(self, predictions, references):
                    same = sum(p == r for p, r in zip(predictions, references))
                    return {"overlap": same / len(predictions), "lengths": [len(p) for p in predictions]}
            """
        )
    )
    expected = {"overlap": 0.5, "lengths_0": 3.0, "lengths_1": 2.0}
    assert lm.compute([str(script.parent)], predictions=["abc", "de"], references=["abc", "xy"]) == expected
    assert lm.compute([script], predictions=["abc", "de"], references=["abc", "xy"]) == expected
    with pytest.raises(ConfigError, match="no such file or directory"):
        lm.compute([str(tmp_path / "missing.py")], predictions=["a"], references=["a"])


def test_bad_input_names_the_problem():
    with pytest.raises(
        ConfigError, match=r"Unknown metric 'rouge3'\. Built-in metrics: accuracy, bleu, chrf"
    ):
        lm.compute(["rouge3"], predictions=["a"], references=["a"])
    with pytest.raises(ConfigError, match="predictions has 2 items but references has 1"):
        lm.compute(["bleu"], predictions=["a", "b"], references=["a"])
    with pytest.raises(ConfigError, match=r"predictions\[1\] must be a string, got int"):
        lm.compute(["bleu"], predictions=["a", 3], references=["a", "b"])
    with pytest.raises(ConfigError, match="Two metrics produce the key 'exact_match'"):
        lm.compute(["exact_match", "exact_match"], predictions=["a"], references=["a"])
    with pytest.raises(ConfigError, match="a metric named 'rouge' already exists"):
        lm.register_metric("rouge", lambda: None)
    with pytest.raises(ConfigError, match="cannot import 'nope' from 'lorakit'"):
        lm.compute(["lorakit:nope"], predictions=["a"], references=["a"])


def test_missing_packages_raise_missing_dependency_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    with pytest.raises(
        MissingDependencyError, match=r"'rouge' metric needs the rouge-score package.*lorakit\[metrics\]"
    ):
        lm.compute(["rouge"], predictions=["a"], references=["a"])
    with pytest.raises(MissingDependencyError, match=r"'chrf' metric needs the sacrebleu package"):
        lm.compute(["chrf"], predictions=["a"], references=["a"])
    assert issubclass(MissingDependencyError, ImportError)


def test_train_lists_missing_metric_packages_before_loading(monkeypatch):
    import importlib.util

    from lorakit.training import _check_environment

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("rouge_score", "sacrebleu") else real(name, *a),
    )
    pipeline = (
        lorakit.Pipeline.from_model("x")
        .with_dataset([{"instruction": "a", "output": "b"}])
        .with_eval(["rouge", "bleu", "exact_match"])
    )
    with pytest.raises(MissingDependencyError) as error:
        _check_environment(pipeline)
    assert "the 'rouge' metric needs rouge-score: pip install 'lorakit[metrics]'" in str(error.value)
    assert "the 'bleu' metric needs sacrebleu" in str(error.value)


def test_metrics_import_is_light():
    import subprocess

    code = (
        "import sys, lorakit; lorakit.metrics.compute(['exact_match', 'accuracy'], predictions=['a'], "
        "references=['a']); print(sorted(m for m in ('torch', 'transformers', 'evaluate') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
