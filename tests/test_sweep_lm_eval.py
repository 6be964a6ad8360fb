"""The lm-evaluation-harness bridge (``--lm-eval``) on a tiny local model and a tiny local task,
offline. Skipped when lm_eval is not installed (the one-line install message for that case is
tested in test_sweep.py).

The task is a ``loglikelihood`` task whose ``acc`` is the harness's own greedy match of the answer,
written over the same {prompt, answer} lines that ``--reasoning`` reads: for every candidate, the
harness's number must equal the ``exact`` metric the sweep computes itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_sweep import EXAMPLE, dense, one_thread, word_tokenizer  # noqa: F401 - fixtures

pytest.importorskip("lm_eval")


def test_lm_eval_bridge(dense, tmp_path: Path, cli, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pre, post = dense
    from transformers import AutoModelForCausalLM

    tok = word_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(str(post), dtype=torch.float32).eval()
    lines = [json.loads(x) for x in EXAMPLE.read_text().splitlines() if x.strip()]
    # half the answers are POST's own greedy next word, so that the match rate is not trivially 0
    specials = set(tok.all_special_ids) | {tok.unk_token_id}
    data = []
    for d in lines:
        ids = tok(d["prompt"])["input_ids"]
        with torch.inference_mode():
            order = model(input_ids=torch.tensor([ids])).logits[0, -1].argsort(descending=True)
        best = next(int(i) for i in order if int(i) not in specials)
        answer = " " + tok.convert_ids_to_tokens(best) if len(data) % 2 == 0 else d["answer"]
        data.append({"prompt": d["prompt"], "answer": answer})
    file = tmp_path / "items.jsonl"
    file.write_text("".join(json.dumps(x) + "\n" for x in data))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "qkr_tiny.yaml").write_text(
        "task: qkr_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {file}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_target: "{{answer}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n"
    )
    res = cli(
        "sweep", pre, post, "--candidates", "post,restore", "--recall", file,
        "--reasoning", file, "--lm-eval", "qkr_tiny", "--lm-eval-include", tasks,
        "--lm-eval-metric", "acc", "--device", "cpu", "--json",
    )  # fmt: skip
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["lm_eval_tasks"] == ["qkr_tiny"]
    post_row = doc["candidates"][0]
    assert post_row["name"] == "post" and post_row["reasoning"]["exact"] >= 0.5
    for r in doc["candidates"]:
        assert set(r["lm_eval"]["qkr_tiny"]) == {"acc,none"}
        assert r["lm_eval"]["qkr_tiny"]["acc,none"] == pytest.approx(r["reasoning"]["exact"])
        assert r["lm_eval_score"] == pytest.approx(r["reasoning"]["exact"])
