"""The engine's commands on a local model directory: edit, ask, eval, layers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_models import FACTS
from typer.testing import CliRunner

from cli import get_app
from qfedit.facts import write_jsonl

runner = CliRunner()


def test_edit_ask_eval_on_a_local_model(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    model = str(tiny_model_dirs["qwen2"])
    write_jsonl(FACTS, tmp_path / "facts.jsonl")
    out = tmp_path / "delta.safetensors"
    done = runner.invoke(
        get_app(),
        [
            "edit",
            model,
            str(tmp_path / "facts.jsonl"),
            "--layer",
            "2",
            "--rule",
            "seed",
            "--out",
            str(out),
            "--unteachable",
            "include",
        ],
    )
    assert done.exit_code == 0, done.output
    assert out.is_file() and "|dW|/|W|" in done.output
    asked = runner.invoke(get_app(), ["ask", model, FACTS[0].question, "--delta", str(out)])
    assert asked.exit_code == 0, asked.output
    measured = runner.invoke(
        get_app(), ["eval", model, str(tmp_path / "facts.jsonl"), "--delta", str(out), "--json"]
    )
    assert measured.exit_code == 0, measured.output
    report = json.loads(measured.stdout)
    assert {"efficacy", "paraphrase", "specificity", "abstention", "counts"} <= set(report)
    assert 0.0 <= report["efficacy"] <= 1.0 and report["counts"]["facts"] == len(FACTS)
    # What nothing was given for is not measured (None), rather than reported perfect.
    for key, count in (
        ("paraphrase", "paraphrases"),
        ("specificity", "specificity"),
        ("abstention", "abstention"),
    ):
        if report["counts"][count] == 0:
            assert report[key] is None, key
        else:
            assert 0.0 <= report[key] <= 1.0, key
    assert report["abstention"] is None  # no --unknown


def test_a_bad_fact_names_line_and_field_and_writes_nothing(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    lines = [
        json.dumps(FACTS[0].to_json()),
        json.dumps({"question": "q?", "answer": "a b", "context": "c", "significance": [1]}),
    ]
    (tmp_path / "facts.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "delta.safetensors"
    done = runner.invoke(
        get_app(),
        [
            "edit",
            str(tiny_model_dirs["qwen2"]),
            str(tmp_path / "facts.jsonl"),
            "--layer",
            "1",
            "--rule",
            "seed",
            "--out",
            str(out),
        ],
    )
    assert done.exit_code == 2
    assert "facts.jsonl line 2: field 'significance'" in done.output
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_preserving_rule_without_a_corpus_is_refused_before_any_work(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    write_jsonl(FACTS, tmp_path / "facts.jsonl")
    out = tmp_path / "delta.safetensors"
    done = runner.invoke(
        get_app(),
        [
            "edit",
            str(tiny_model_dirs["qwen2"]),
            str(tmp_path / "facts.jsonl"),
            "--layer",
            "1",
            "--out",
            str(out),
            "--unteachable",
            "include",
        ],
    )
    assert done.exit_code == 2 and "preservation corpus" in done.output
    assert not out.exists()
    write_jsonl(FACTS, tmp_path / "known.jsonl")
    done = runner.invoke(
        get_app(),
        [
            "edit",
            str(tiny_model_dirs["qwen2"]),
            str(tmp_path / "facts.jsonl"),
            "--layer",
            "1",
            "--out",
            str(out),
            "--unteachable",
            "include",
            "--preserve",
            str(tmp_path / "known.jsonl"),
            "--lam",
            "0.5",
        ],
    )
    assert done.exit_code == 0, done.output
    assert "rule preserve" in done.output


def test_edit_spread_over_layers_writes_one_tensor_per_layer(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from qfedit.delta import Delta

    model = str(tiny_model_dirs["qwen2"])
    write_jsonl(FACTS, tmp_path / "facts.jsonl")
    out = tmp_path / "delta.safetensors"
    args = [
        "edit",
        model,
        str(tmp_path / "facts.jsonl"),
        "--rule",
        "seed",
        "--unteachable",
        "include",
        "--out",
        str(out),
    ]
    done = runner.invoke(get_app(), [*args, "--layers", "1-2"])
    assert done.exit_code == 0, done.output
    delta = Delta.load(out)
    assert sorted(delta.tensors) == [f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2)]
    assert delta.metadata["layers"] == [1, 2] and set(delta.metadata["per_layer"]) == {"1", "2"}
    for bad, reason in (
        (["--layers", "2,1"], "distinct and increasing"),
        (["--layers", "0,1", "--layer", "2"], "must end at the edit's layer 2"),
        (["--layers", "one,two"], "not a list of layer numbers"),
        ([], "give --layer N or --layers"),
    ):
        refused = runner.invoke(get_app(), [*args[:-2], "--out", str(tmp_path / "x.safetensors"), *bad])
        assert refused.exit_code == 2, (bad, refused.output)
        assert reason in refused.output, (bad, refused.output)
    assert not (tmp_path / "x.safetensors").exists()


def test_layers_recommends_the_reading_layer_and_a_spread_ending_there(tmp_path: Path) -> None:
    from qfedit.demo import DEMO_MODEL_DIR, EDITS_PATH
    from qfedit.facts import read_jsonl

    write_jsonl(read_jsonl(EDITS_PATH)[:8], tmp_path / "probe.jsonl")
    done = runner.invoke(
        get_app(), ["layers", str(DEMO_MODEL_DIR), str(tmp_path / "probe.jsonl"), "--probe", "8"]
    )
    assert done.exit_code == 0, done.output
    # The demo model reads its context in its last layer (4): only an edit there, or a spread
    # whose target is taken there, teaches anything.
    assert "recommended layer: 4" in done.output
    line = next(row for row in done.output.splitlines() if row.startswith("recommended layers:"))
    spread = [int(x) for x in line.split()[2].split(",")]
    assert spread[-1] == 4 and spread == list(range(spread[0], 5))


def test_recommend_spread_is_the_widest_that_works() -> None:
    from qfedit.layers import SpreadScan, recommend_spread

    scans = [
        SpreadScan((4,), 1.0, 1.0),
        SpreadScan((3, 4), 0.98, 0.8),
        SpreadScan((2, 3, 4), 0.9, 0.7),
        SpreadScan((1, 2, 3, 4), 0.97, 0.6),
    ]
    assert recommend_spread(scans) == (1, 2, 3, 4)
    assert recommend_spread(scans[:3]) == (3, 4)


def test_edit_leaves_out_and_names_facts_the_model_cannot_read(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """A tiny random model answers nothing right even with the fact in context: nothing to teach."""
    write_jsonl(FACTS, tmp_path / "facts.jsonl")
    out = tmp_path / "delta.safetensors"
    args = ["edit", str(tiny_model_dirs["qwen2"]), str(tmp_path / "facts.jsonl"), "--layer", "1"]
    done = runner.invoke(get_app(), [*args, "--rule", "seed", "--out", str(out)])
    assert done.exit_code == 2, done.output
    assert "every fact is unteachable" in done.output
    assert done.output.count("left out facts.jsonl line") == len(FACTS)
    assert not out.exists()


def test_edit_keeps_what_the_demo_model_reads_and_leaves_out_what_it_does_not(tmp_path: Path) -> None:
    from qfedit.delta import Delta
    from qfedit.demo import DEMO_MODEL_DIR, EDITS_PATH
    from qfedit.facts import read_jsonl

    good = read_jsonl(EDITS_PATH)[:3]
    # The context says one thing, the answer another: the model reads the context, not the answer.
    wrong = good[0].model_copy(update={"answer": good[1].answer, "paraphrases": (), "neighbors": ()})
    write_jsonl([*good, wrong], tmp_path / "facts.jsonl")
    out = tmp_path / "delta.safetensors"
    done = runner.invoke(
        get_app(),
        [
            "edit",
            str(DEMO_MODEL_DIR),
            str(tmp_path / "facts.jsonl"),
            "--layer",
            "4",
            "--rule",
            "seed",
            "--out",
            str(out),
        ],
    )
    assert done.exit_code == 0, done.output
    assert "left out facts.jsonl line 4" in done.output
    assert "line 1" not in done.output and "line 2" not in done.output
    assert Delta.load(out).metadata["facts"] == 3


def test_repeated_preserve_uses_every_file(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    from qfedit.delta import Delta

    write_jsonl(FACTS, tmp_path / "facts.jsonl")
    write_jsonl(FACTS[:1], tmp_path / "a.jsonl")
    write_jsonl(FACTS[1:], tmp_path / "b.jsonl")
    digests = []
    for corpus in (["a.jsonl", "b.jsonl"], ["b.jsonl"]):
        out = tmp_path / f"{len(corpus)}.safetensors"
        preserve = [arg for name in corpus for arg in ("--preserve", str(tmp_path / name))]
        done = runner.invoke(
            get_app(),
            [
                "edit",
                str(tiny_model_dirs["qwen2"]),
                str(tmp_path / "facts.jsonl"),
                "--layer",
                "1",
                "--unteachable",
                "include",
                "--out",
                str(out),
                *preserve,
            ],
        )
        assert done.exit_code == 0, done.output
        digests.append(Delta.load(out).metadata["corpus_digest"])
    assert digests[0] != digests[1]  # A then B is not B alone


def test_edit_caches_the_preservation_covariance_in_the_data_folder(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, data_folder: Path
) -> None:
    from qfedit.delta import Delta

    write_jsonl(FACTS, tmp_path / "facts.jsonl")
    write_jsonl(FACTS, tmp_path / "known.jsonl")
    args = ["edit", str(tiny_model_dirs["qwen2"]), str(tmp_path / "facts.jsonl"), "--layers", "1-2"]
    args += ["--unteachable", "include", "--preserve", str(tmp_path / "known.jsonl")]
    first = runner.invoke(get_app(), [*args, "--out", str(tmp_path / "a.safetensors")])
    assert first.exit_code == 0, first.output
    cached = sorted((data_folder / "cache").glob("covariance-*.safetensors"))
    assert len(cached) == 2  # one per edited layer
    stamps = [path.stat().st_mtime_ns for path in cached]
    second = runner.invoke(get_app(), [*args, "--out", str(tmp_path / "b.safetensors")])
    assert second.exit_code == 0, second.output
    assert [path.stat().st_mtime_ns for path in cached] == stamps  # read, not computed again
    a, b = Delta.load(tmp_path / "a.safetensors"), Delta.load(tmp_path / "b.safetensors")
    assert all(torch.equal(a.tensors[name], b.tensors[name]) for name in a.tensors)
    # --no-cache computes it afresh and leaves the cache alone.
    for path in cached:
        path.unlink()
    third = runner.invoke(get_app(), [*args, "--no-cache", "--out", str(tmp_path / "c.safetensors")])
    assert third.exit_code == 0, third.output
    assert not list((data_folder / "cache").glob("covariance-*"))


def test_edit_preset_demo_uses_the_demo_settings_and_options_override_them(tmp_path: Path) -> None:
    from qfedit.delta import Delta
    from qfedit.demo import DEMO_MODEL_DIR, EDITS_PATH
    from qfedit.demo.settings import DEMO_LAYERS, DEMO_SOLVE
    from qfedit.facts import read_jsonl

    write_jsonl(read_jsonl(EDITS_PATH)[:2], tmp_path / "facts.jsonl")
    args = [
        "edit",
        str(DEMO_MODEL_DIR),
        str(tmp_path / "facts.jsonl"),
        "--preset",
        "demo",
        "--samples",
        "300",
    ]
    done = runner.invoke(get_app(), [*args, "--out", str(tmp_path / "a.safetensors")])
    assert done.exit_code == 0, done.output
    made = Delta.load(tmp_path / "a.safetensors").metadata["hparams"]
    assert made["layers"] == DEMO_LAYERS and made["solve"]["lam"] == DEMO_SOLVE["lam"]
    assert made["solve"]["ridge"] == DEMO_SOLVE["ridge"]
    done = runner.invoke(
        get_app(),
        [
            *args,
            "--lam",
            "50",
            "--layer",
            "4",
            "--target-span",
            "3",
            "--target-margin",
            "0.5",
            "--phrasings",
            "2",
            "--out",
            str(tmp_path / "b.safetensors"),
        ],
    )
    assert done.exit_code == 0, done.output
    made = Delta.load(tmp_path / "b.safetensors").metadata["hparams"]
    assert (made["layers"], made["solve"]["lam"], made["target_span"]) == (None, 50.0, 3)
    assert (
        made["target_margin"] == 0.5
        and "target_margin" in Delta.load(tmp_path / "a.safetensors").metadata["hparams"]
    )
    assert (
        made["phrasings"] == 2
        and Delta.load(tmp_path / "a.safetensors").metadata["hparams"]["phrasings"] == 0
    )
