"""PipelineConfig: JSON round trip, the generic default, and a clear error for each invalid config."""
import json

import pytest

from nanoflow_jax.runtime import plan


def _cfg_dict():
  return json.loads(plan.generic_default(2048, 132).to_json())


def test_generic_default_round_trips_and_splits_buckets(tmp_path):
  cfg = plan.generic_default(2048, 132)
  path = tmp_path / "p.json"
  path.write_text(cfg.to_json())
  assert plan.PipelineConfig.load(str(path)) == cfg
  assert cfg.nano_batches == [1024, 1024]
  assert cfg.sizes_for(1024, 128) == [512, 512] and cfg.sizes_for(128, 128) == [128]


def _broken(fn):
  d = _cfg_dict()
  fn(d)
  return d


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(nano_batches=[1000, 1000]), "do not cover"),
    (lambda d: d["ops"].pop(), "missing"),
    (lambda d: d["ops"].append(dict(d["ops"][0])), "appears twice"),
    (lambda d: d["ops"][0]["deps"].append("qkv@7"), "unknown dependency"),
    (lambda d: d["ops"][1]["deps"].append("down@0"), "cycle"),
    (lambda d: d["ops"][6].update(deps=[]), "must depend on attention@0"),
    (lambda d: d["ops"][4].update(deps=["rope_append@0"]), "all KV appends"),
    (lambda d: d["ops"][5].update(sm_share=100), "may run at once"),
    (lambda d: d["ops"][2].update(sm_share=500), "outside"),
    (lambda d: d.update(version=9), "version"),
    (lambda d: d.pop("ops"), "malformed"),
])
def test_invalid_configs_are_refused(mutate, match):
  with pytest.raises(plan.PipelineConfigError, match=match):
    plan.PipelineConfig.from_dict(_broken(mutate))
