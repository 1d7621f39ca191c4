"""One specification: the model `semalign experiment` measures as the served one and the model the refresh trains are
built from the same specification into equal configurations and equal initial weights (small synthetic catalogue:
a real split, a real codebook version, the real item-table and model-building code of both)."""
import json

import numpy as np
import pytest
import torch

from semalign.config import Settings


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    from semalign.data import load_dataset
    from semalign.flows.semantic_ids import EncoderOutput, TowerFeatures
    from semalign.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("catalogue")
    generate(root / "shop", SynthConfig(items=120, users=60, events=1500, topics=6, vocab=200))
    ds = load_dataset(root / "shop")
    rng = np.random.default_rng(0)
    feats = TowerFeatures(text=rng.normal(size=(ds.n_items, 16)).astype(np.float32), image=None,
                          has_image=np.zeros(ds.n_items, bool), text_model="t", image_model=None, computed={})
    enc = EncoderOutput(version="enc-test", embeddings=rng.normal(size=(ds.n_items, 8)).astype(np.float32),
                        metrics={}, reused=False)
    return {"root": root, "ds": ds, "feats": feats, "enc": enc}


def _both_models(settings: Settings, catalogue, experiment_model: str):
    """(the refresh's specification and initial model, the experiment's) for `experiment_model` under `settings`."""
    from semalign.data import settings_split
    from semalign.features import N_USER_FEATS
    from semalign.flows.experiment import generic_content, model_spec
    from semalign.flows.ranker_stages import ranker_inputs, ranker_tables
    from semalign.flows.semantic_ids import codebook_stage, load_codebook
    from semalign.models.ranker_training import initial_model

    ds, feats = catalogue["ds"], catalogue["feats"]
    split = settings_split(ds, settings)
    cb = codebook_stage(settings, ds, split, catalogue["enc"], parent=None, move_latest=False)
    codebook = load_codebook(settings, cb.version)
    served, served_tables = ranker_inputs(settings, ds, split, cb, codebook, feats)      # the refresh
    # the experiment, with the command line's default options for every model
    measured, _ = model_spec(settings, experiment_model, ds.n_items, {"cross_attention": True, "align_init": "zero"})
    measured = measured.with_codebook(codebook)
    measured_tables = ranker_tables(ds, split, cb, codebook, feats, measured.ranker, generic=generic_content(feats))
    return (served, initial_model(served.ranker, served_tables, N_USER_FEATS),
            measured, initial_model(measured.ranker, measured_tables, N_USER_FEATS))


def _assert_same(served, served_model, measured, measured_model):
    assert served == measured, (served, measured)
    a, b = served_model.state_dict(), measured_model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_the_default_served_model_and_every_lever_the_settings_choose(catalogue):
    s = Settings(home=catalogue["root"] / "home")
    served, m1, measured, m2 = _both_models(s, catalogue, "aligned_content")
    _assert_same(served, m1, measured, m2)
    assert served.model == "aligned_content" and served.codebook["codes"] >= 2   # the codebook's own count
    # levers the experiment can choose have a refresh setting: SEMALIGN_RANKER_LEVERS, in the experiment's syntax
    levers = "cold_view=0.5+code_dropout=0.2+align_levels=1+ngram=true+cold_behavior=generated"
    s = Settings(home=catalogue["root"] / "home", ranker_variant="full", ranker_levers=levers)
    served, m1, measured, m2 = _both_models(s, catalogue, f"full@{levers}")
    _assert_same(served, m1, measured, m2)
    assert (served.ranker.cold_view, served.ranker.code_dropout, served.ranker.align_levels, served.ranker.ngram) == \
        (0.5, 0.2, 1, True)
    # a lever the refresh would not set is another configuration: the comparison can fail
    other, _, _, _ = _both_models(Settings(home=catalogue["root"] / "home", ranker_variant="full"), catalogue, "full")
    assert other != served


def test_the_selected_specification_is_the_one_the_refresh_trains_and_writes(catalogue, tmp_path):
    from dataclasses import asdict

    from semalign.flows.experiment import model_spec
    from semalign.spec import specification, write_selection

    home = tmp_path / "home"
    s = Settings(home=home, encoder_epochs=3)
    models = ["aligned_content", "full@cold_view=0.5+align_levels=1", "sid@codebook_levels=2+items_per_row=4"]
    configs = {}
    for m in models:
        spec, size = model_spec(s, m, catalogue["ds"].n_items)
        configs[m] = {**{k: v for k, v in asdict(spec.ranker).items() if k != "seed"},
                      **({"codebook": size} if size else {})}
    up = specification(s, "aligned_content")
    result = {"models": models, "configs": configs, "dataset": "shop", "split": "cold-items", "seeds": [0],
              "fits": [{"model": m, "val_cold_gauc": g} for m, g in zip(models, (0.60, 0.62, 0.61))],
              "upstream": {"encoder": up.encoder, "codebook": up.codebook}}
    written = write_selection(s, result)
    assert written["model"] == "full@cold_view=0.5+align_levels=1"
    assert json.loads((home / "ranker_spec.json").read_text())["encoder"]["epochs"] == 3
    after = Settings(home=home)   # a later refresh, without the experiment's options: it reads them from the spec
    assert after.encoder_epochs == 3
    served, m1, measured, m2 = _both_models(after, catalogue, written["model"])
    _assert_same(served, m1, measured, m2)
    with pytest.raises(ValueError, match="disagrees with the ranker spec"):
        Settings(home=home, encoder_epochs=4)
    # the spec is written beside the trained ranker as JSON: read back, it is the same object
    path = served.write(tmp_path / "spec.json")
    assert json.loads(path.read_text()) == served.as_dict() and served.as_dict()["ranker"]["cold_view"] == 0.5
    # a spec file of the older kind (ranker only: variant + levers) still reads
    old = tmp_path / "old_spec.json"
    old.write_text(json.dumps({"kind": "semalign.ranker_spec/1", "model": "full@cold_view=0.5", "variant": "full",
                               "levers": {"cold_view": 0.5}}))
    assert specification(Settings(home=tmp_path, ranker_spec=old)).ranker.cold_view == 0.5
