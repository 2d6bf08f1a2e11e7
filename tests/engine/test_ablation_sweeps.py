"""`cpal ablate --sweep`: which runs each sweep adds."""

from cpal.ablation import VARIANTS, arms
from cpal.config import load_config


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
