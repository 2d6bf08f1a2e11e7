"""`cpal ablate --sweep`: which runs each sweep adds."""

from cpal.ablation import arms
from cpal.config import load_config
from cpal.methods import ablation_ladder

VARIANTS = ablation_ladder()


def test_score_sweep_uses_raw_prototypes_and_main_arms_do_not():
    main = arms()
    assert [a.name for a in main] == list(VARIANTS)
    assert all(not any("normalize" in o for o in a.overrides) for a in main)
    score = arms(["score"])[len(VARIANTS):]
    assert [a.name for a in score] == [
        "cpal normalize=false score=dot", "cpal normalize=false score=cosine",
        "cpal normalize=false score=l2",
    ]
    for arm, value in zip(score, ("dot", "cosine", "l2"), strict=True):
        cfg = load_config(None, list(arm.overrides))
        assert (cfg.method, cfg.prototype.normalize, cfg.awareness.score) == (
            "cpal", False, value)
    k = arms(["k"])[len(VARIANTS):]
    assert k[0].overrides == ("method=cpal", "awareness.top_k=1")


def _fake_metrics(cfg) -> dict:
    best = {"miou": 50.0, "threshold": 0.5, "foreground_precision": 60.0,
            "foreground_recall": 70.0}
    return {"maps": {cfg.labels.split: {"map": cfg.map_kind, "oracle_best": best}},
            "pseudo_labels": {"miou": 40.0, "protocol": {"description": "p"}},
            "threshold": {"value": 0.5}}


def test_an_arm_equal_to_an_earlier_one_is_not_trained_twice(tmp_path, monkeypatch):
    import cpal.ablation as ablation

    trained = []

    def fake_run(cfg, **_):
        trained.append(cfg.output_dir)
        return _fake_metrics(cfg)

    monkeypatch.setattr(ablation, "run", fake_run)
    overrides = [f"output_dir={tmp_path}", "awareness.top_k=3"]
    md = ablation.ablate(None, overrides, seeds=1, sweeps=["k"])
    # 5 variants + 4 values of K, of which K=3 is exactly the `cpal` arm: 8 trainings.
    assert len(trained) == 8
    assert not any("top_k_3" in path for path in trained)
    assert "| cpal top_k=3 | pacam | 50.0 ± 0.0 |" in md.read_text()


def test_sweeps_only_skips_the_five_variants(tmp_path, monkeypatch):
    import cpal.ablation as ablation

    names = [a.name for a in arms(["k"], variants=False)]
    assert names == ["cpal top_k=1", "cpal top_k=3", "cpal top_k=5", "cpal top_k=10"]
    monkeypatch.setattr(ablation, "run", lambda cfg, **_: _fake_metrics(cfg))
    md = ablation.ablate(None, [f"output_dir={tmp_path}"], seeds=2, sweeps=["score"],
                         variants=False).read_text()
    assert "| cam |" not in md and "| cpal normalize=false score=l2 |" in md


def test_sweeps_only_without_a_sweep_is_a_one_line_error(tmp_path, capsys):
    from cpal.cli import main

    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    assert main(["ablate", str(config), "--sweeps-only"]) == 2
    assert "--sweeps-only needs at least one --sweep" in capsys.readouterr().err


def test_earlier_and_sfc_sweeps_switch_one_choice_on_sipe():
    earlier = arms(["earlier", "sfc"], variants=False)
    assert all(a.overrides[0] == "method=sipe" and a.name.startswith("sipe: ") for a in earlier)
    for arm in earlier:
        cfg = load_config(None, list(arm.overrides))  # every override is a valid key
        assert cfg.method == "sipe"
    by_name = {a.name: a.overrides[1:] for a in earlier}
    assert by_name["sipe: L_self over present channels"] == ("loss.self_average=present",)
    assert by_name["sipe: SFC PCM seeds (bg x 0.3)"] == (
        "prototype.seed_source=pcm", "prototype.bg_factor=0.3")
    assert len({a.name for a in earlier}) == len(earlier)


def test_context_sweep_switches_one_choice_on_cpal():
    context = arms(["context"], variants=False)
    assert [a.name for a in context] == ["cpal: background keeps its instance prototype",
                                        "cpal: context weight alpha 0.25"]
    instance = load_config(None, list(context[0].overrides))
    assert instance.method == "cpal" and instance.awareness.background == "instance"
    assert load_config(None, list(context[1].overrides)).awareness.alpha == 0.25
