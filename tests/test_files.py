"""files.detect_kind / files.expect: every file argument is told by what it holds, and a wrong one
says what it found, what was expected and where the expected thing is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autointerp import cli
from autointerp.errors import UserError
from autointerp.files import Kind, detect_kind, expect
from autointerp.jsonl import write_jsonl
from autointerp.schema import Context, FeatureRecord

DEV = Path(__file__).resolve().parents[2] / "shared/data/llmjp_sae_human_labels.dev.jsonl.gz"
LLMJP_DEMO = Path(__file__).resolve().parent / "data" / "llmjp_demo"

LABEL = {"checkpoint_step": 600, "feature": 165, "description": "x", "granularity": "token", "cross_lingual": False,
         "language": "en", "language_profile": {}, "scores": {}, "confidence": 0.5, "explainer": {}}


def _records(n: int = 3, step: int = 600) -> list[FeatureRecord]:
    return [FeatureRecord("m", 0, step, i, [Context(["a", "b"], [0, 10])] if i % 2 == 0 else []) for i in range(n)]


def _lm(folder: Path) -> Path:
    """What `lm train` leaves: a Hugging Face config with weights (their bytes do not matter here)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"\0")
    return folder


@pytest.fixture()
def run(tmp_path) -> Path:
    """A run as the pipeline leaves it: lm/step-600, step-600/{sae, records, labels}."""
    from autointerp.sae.io import save_sae
    from autointerp.sae.model import SAEConfig, TopKSAE

    d = tmp_path / "runs" / "demo"
    _lm(d / "lm" / "step-600")
    save_sae(TopKSAE(SAEConfig(d_model=4, d_sae=8, k=2)), d / "step-600" / "sae")
    write_jsonl(d / "step-600" / "records.jsonl.zst", _records())
    write_jsonl(d / "step-600" / "labels.jsonl", [LABEL])
    (d / "manifest.json").write_text("{}")
    return d


def test_kinds(run, tmp_path):
    step = run / "step-600"
    assert detect_kind(step / "records.jsonl.zst") == Kind.RECORDS
    assert detect_kind(step / "labels.jsonl") == Kind.LABELS
    assert detect_kind(step / "sae") == Kind.SAE
    assert detect_kind(step / "sae" / "sae.safetensors") == Kind.SAE
    assert detect_kind(step) == Kind.CHECKPOINT
    assert detect_kind(run) == Kind.RUN
    assert detect_kind(run / "lm" / "step-600") == Kind.LM
    assert detect_kind(run / "lm") == Kind.LM_CHECKPOINTS
    assert detect_kind(LLMJP_DEMO) == Kind.LLMJP_DEMO
    rows = {"human.jsonl": {"checkpoint_step": 600, "feature": 1, "granularity": "token", "annotator": "a"},
            "explanations.jsonl": {"checkpoint_step": 600, "feature": 1, "description": "d", "granularity": None,
                                   "cross_lingual": False, "confidence": 0, "explainer": {}},
            "scores.jsonl": {"checkpoint_step": 600, "feature": 1, "simulation": 0.1},
            "lineage.jsonl": {"checkpoint_step": 600, "feature": 1, "parent_step": 100, "parent_feature": 3},
            "other.jsonl": {"a": 1}}
    kinds = {"human.jsonl": Kind.HUMAN_LABELS, "explanations.jsonl": Kind.EXPLANATIONS,
             "scores.jsonl": Kind.SCORES, "lineage.jsonl": Kind.LINEAGE, "other.jsonl": Kind.UNKNOWN}
    for name, row in rows.items():
        (tmp_path / name).write_text(json.dumps(row) + "\n")
        assert detect_kind(tmp_path / name) == kinds[name], name
    (tmp_path / "empty.jsonl").write_text("")
    assert detect_kind(tmp_path / "empty.jsonl") == Kind.EMPTY
    (tmp_path / "labels.csv").write_text("feature,checkpoint,granularity\n1,10,token\n")
    assert detect_kind(tmp_path / "labels.csv") == Kind.HUMAN_LABELS
    assert detect_kind(tmp_path / "nothing-here") == Kind.MISSING
    if DEV.exists():  # records with human fields: both records and human labels
        assert detect_kind(DEV) == Kind.HUMAN_RECORDS
        assert expect(DEV, Kind.RECORDS) == DEV and expect(DEV, Kind.HUMAN_LABELS) == DEV


def test_wrong_files_say_what_they_hold_and_where_the_right_one_is(run):
    step = run / "step-600"
    with pytest.raises(UserError) as err:
        expect(step / "labels.jsonl", Kind.RECORDS)
    assert str(err.value) == (f"{step}/labels.jsonl holds labels, not feature records; "
                              f"records are in {step}/records.jsonl.zst")
    with pytest.raises(UserError, match=f"^{step} is a checkpoint folder, not a run folder; the run folder is {run}$"):
        expect(step, Kind.RUN)
    with pytest.raises(UserError, match=f"is a language-model checkpoint, not an SAE folder; "
                                        f"the SAE of this checkpoint is {step}/sae"):
        expect(run / "lm" / "step-600", Kind.SAE)
    with pytest.raises(UserError, match=f"is a run folder, not feature records; records are in {step}/records"):
        expect(run, Kind.RECORDS)
    with pytest.raises(UserError, match="holds feature records, not labels; labels are in"):
        expect(step / "records.jsonl.zst", Kind.LABELS)
    with pytest.raises(UserError, match="no such file or folder"):
        expect(run / "step-7", Kind.RUN)


def _main(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stop:
        cli.main(list(args))
    return int(stop.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["records", "show", "{step}/labels.jsonl", "--feature", "1"], "holds labels, not feature records"),
    (["annotate", "{step}/labels.jsonl", "--out", "{run}/../h.jsonl"], "holds labels, not feature records or a run"),
    (["annotate", "{run}", "--out", "{step}/records.jsonl.zst"], "--out {step}/records.jsonl.zst holds feature records, "
                                                                 "not human labels"),
    (["report", "{step}"], "is a checkpoint folder, not a run folder; the run folder is {run}"),
    (["report", "{run}", "--human", "{step}/records.jsonl.zst"], "holds feature records, not labels"),
    (["compare", "{step}/records.jsonl.zst", "{run}"], "holds feature records, not labels"),
    (["sae", "metrics", "{step}"], "is a checkpoint folder, not an SAE folder; its SAE is {step}/sae"),
    (["collect", "{step}"], "is a checkpoint folder, not a run folder or an SAE folder"),
    (["collect", "{step}/records.jsonl.zst", "--out", "x.jsonl"], "holds feature records, not a run folder or an SAE folder"),
    (["lineage", "{run}/lm"], "is a folder of language-model checkpoints, not a run folder"),
])
def test_commands_check_their_files_first(capsys, run, args, message):
    step = run / "step-600"
    fill = lambda s: s.replace("{step}", str(step)).replace("{run}", str(run))  # noqa: E731
    code, err = _main(capsys, *map(fill, args))
    assert code == 1 and fill(message) in err, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
