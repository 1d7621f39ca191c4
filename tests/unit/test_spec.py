"""The catalogue chooses its model: `semalign experiment --select` writes the spec the refresh then trains."""
import json
from dataclasses import asdict

import pytest

from semalign.config import Settings
from semalign.errors import InvalidInputError
from semalign.spec import ranker_config, served_model, write_selection


def _result(models, gauc):
    from semalign.spec import id_budget, parse_model

    configs = {}
    for m in models:
        variant, levers = parse_model(m)
        cfg = ranker_config(Settings(), variant, 0, **id_budget(levers, 1000))
        configs[m] = {k: v for k, v in asdict(cfg).items() if k != "seed"}
    fits = [{"seed": s, "model": m, "val_cold_gauc": gauc[m] + 0.001 * s} for s in range(3) for m in models]
    return {"dataset": "shop", "split": "cold-items", "seeds": [0, 1, 2], "models": models, "configs": configs,
            "fits": fits}


def test_selection_picks_the_best_pseudo_cold_validation_model_and_the_refresh_trains_it(tmp_path):
    s = Settings(home=tmp_path)
    assert served_model(s) == "aligned_content" and ranker_config(s).variant == "aligned_content"
    models = ["aligned_content", "sid@items_per_row=10", "full@align_levels=1"]
    spec = write_selection(s, _result(models, {"aligned_content": 0.61, "sid@items_per_row=10": 0.63,
                                               "full@align_levels=1": 0.62}))
    assert spec["model"] == "sid@items_per_row=10" and (tmp_path / "ranker_spec.json").exists()
    assert json.loads((tmp_path / "ranker_spec.json").read_text())["selection"]["validation"]["aligned_content"]
    cfg = ranker_config(s)  # the refresh's configuration: the selected model, its budget in rows of this catalogue
    assert cfg.variant == "sid" and cfg.id_buckets == 100 and cfg.seed == s.seed
    assert served_model(s) == "sid@items_per_row=10"
    assert ranker_config(s, "aligned_content").variant == "aligned_content"   # baselines stay themselves
    # the compact profile only selects what it can serve
    compact = Settings(home=tmp_path / "c", serving_profile="compact")
    spec = write_selection(compact, _result(["aligned_content", "sid@items_per_row=10"],
                                            {"aligned_content": 0.70, "sid@items_per_row=10": 0.60}))
    assert spec["variant"] == "sid"


def test_a_broken_spec_or_an_unservable_one_is_refused_by_name(tmp_path):
    bad = tmp_path / "spec.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidInputError, match="spec.json: not a readable ranker spec"):
        ranker_config(Settings(home=tmp_path, ranker_spec=bad))
    bad.write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(InvalidInputError, match="expected a ranker spec"):
        ranker_config(Settings(home=tmp_path, ranker_spec=bad))
    with pytest.raises(InvalidInputError, match="compact"):
        ranker_config(Settings(home=tmp_path, serving_profile="compact"))   # aligned_content reads vectors
    with pytest.raises(InvalidInputError, match="id_buckets"):
        ranker_config(Settings(home=tmp_path, ranker_variant="hashed_id+dense"))


def test_a_selected_codebook_size_sizes_the_refreshs_codebooks_and_contradictions_are_refused(tmp_path):
    from pydantic import ValidationError

    from semalign.spec import codebook_levers, parse_model

    variant, levers = parse_model("sid@codebook_levels=4+codebook_codes=64+items_per_row=10")
    assert variant == "sid" and codebook_levers(levers) == ({"items_per_row": 10.0}, {"levels": 4, "codes": 64})
    with pytest.raises(ValueError, match="codebook_codes must be >= 2"):
        codebook_levers(parse_model("sid@codebook_codes=1")[1])
    s = Settings(home=tmp_path)
    assert (s.codebook_levels, s.codebook_codes) == (3, None)   # no spec: the settings' size (codes by catalogue)
    res = _result(["aligned_content", "sid@items_per_row=10"], {"aligned_content": 0.60, "sid@items_per_row=10": 0.65})
    res["configs"]["sid@items_per_row=10"]["codebook"] = {"levels": 4, "codes": 64}
    spec = write_selection(s, res)
    assert spec["codebook"] == {"levels": 4, "codes": 64} and "codebook" not in spec["ranker"]
    after = Settings(home=tmp_path)   # the next refresh builds its codebooks at the selected size
    assert (after.codebook_levels, after.codebook_codes) == (4, 64) and ranker_config(after).variant == "sid"
    assert Settings(home=tmp_path, codebook_codes=64).codebook_codes == 64   # agreeing settings are fine
    with pytest.raises(ValidationError, match="disagrees with the ranker spec"):
        Settings(home=tmp_path, codebook_levels=3)
