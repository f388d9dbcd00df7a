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


def test_tensor_parallel_plans_have_their_allreduces_as_nano_ops():
  for tp in (2, 4):
    cfg = plan.generic_default(2048, 132, tp=tp)
    ids = [o.id for o in cfg.ops]
    for nb in (0, 1):
      for op in ("o", "down"):
        assert ids.index(f"{op}_allreduce@{nb}") > ids.index(f"{op}@{nb}")
        assert plan.RESOURCE[f"{op}_allreduce"] == "network"
    # nano-batch 0's all-reduces may run beside nano-batch 1's attention (no dependency between them)
    anc = cfg._ancestors()
    assert "o_allreduce@0" not in anc["attention@1"] and "attention@1" not in anc["o_allreduce@0"]
    assert plan.PipelineConfig.from_dict(json.loads(cfg.to_json())).tp == tp
  assert [o.op for o in plan.single(2048, 132, tp=2).ops] == list(plan.TP_OPS)
  assert plan.single(2048, 132, tp=2).ops[0].deps == ["prev:down_allreduce@0"]   # after the last all-reduce


def test_tensor_parallel_plan_checks():
  d = json.loads(plan.generic_default(2048, 132, tp=2).to_json())
  d["ops"] = [o for o in d["ops"] if o["op"] != "down_allreduce"]
  with pytest.raises(plan.PipelineConfigError, match="missing"):
    plan.PipelineConfig.from_dict(d)
  d = json.loads(plan.generic_default(2048, 132).to_json())
  d.pop("tp")                                  # files written before "tp" existed read as TP 1
  assert plan.PipelineConfig.from_dict(d).tp == 1
  d["tp"] = 2                                  # a TP-1 plan's ops lack the all-reduces
  with pytest.raises(plan.PipelineConfigError, match="allreduce"):
    plan.PipelineConfig.from_dict(d)


def test_decode_overlap_puts_the_decode_attention_beside_the_prefill_gemms():
  cfg = plan.decode_overlap(2048, 132, decode_rows=500)
  assert cfg.nano_batches == [512, 1536]
  anc = cfg._ancestors()
  for gemm in ("o@1", "gate_up@1", "down@1"):       # may run at once with the decode attention
    assert gemm not in anc["attention@0"] and "attention@0" not in anc[gemm]
  assert plan.decode_overlap(256, 132, decode_rows=1000).nano_batches == [128, 128]   # clamped
  for tp in (2, 4):
    plan.decode_overlap(2048, 132, 512, tp=tp).validate()


@pytest.mark.parametrize("tp", [1, 4])
def test_decode_overlap_can_keep_down_off_the_attentions_side(tp):
  cfg = plan.decode_overlap(2048, 132, decode_rows=512, tp=tp, beside=("o", "gate_up"))
  assert cfg.name == ("decode-overlap-o+gate_up" if tp == 1 else "decode-overlap-o+gate_up-tp4")
  anc = cfg._ancestors()
  for gemm in ("o@1", "gate_up@1"):                  # still beside the decode attention
    assert gemm not in anc["attention@0"] and "attention@0" not in anc[gemm]
  assert "attention@0" in anc["down@1"]              # after it, on the whole GPU (less the network's share)
  down = next(o for o in cfg.ops if o.id == "down@1")
  assert down.sm_share == 132 - (plan.NETWORK_SMS if tp > 1 else 0)
  out = plan.with_beside_share(cfg, 48)              # the share change leaves down@1 whole
  assert next(o for o in out.ops if o.id == "down@1").sm_share == down.sm_share
  assert next(o for o in out.ops if o.id == "gate_up@1").sm_share == 132 - 48 - (plan.NETWORK_SMS if tp > 1 else 0)
  for bad in [(), ("gate_up",), ("o", "down")]:
    with pytest.raises(plan.PipelineConfigError, match="prefix"):
      plan.decode_overlap(2048, 132, 512, beside=bad)


@pytest.mark.parametrize("template", [lambda: plan.generic_default(2048, 132),
                                      lambda: plan.decode_overlap(2048, 132, 512),
                                      lambda: plan.generic_default(2048, 132, tp=2)])
def test_with_beside_share_moves_the_attention_and_the_gemms_beside_it(template):
  cfg = template()
  out = plan.with_beside_share(cfg, 48)
  attn = [o for o in out.ops if o.op == "attention" and o.sm_share < 132]
  assert [o.sm_share for o in attn] == [48]
  anc = out._ancestors()
  beside = [o for o in out.ops if plan.RESOURCE[o.op] == "compute"
            and o.id not in anc[attn[0].id] and attn[0].id not in anc[o.id]]
  net = plan.NETWORK_SMS if cfg.tp > 1 else 0
  assert beside and all(o.sm_share == 132 - 48 - net for o in beside)
  others = [o for o in out.ops if o not in beside and o is not attn[0]]
  assert all(o.sm_share == c.sm_share for o, c in zip(others, [c for c in cfg.ops if c.id in {o.id for o in others}]))
  with pytest.raises(plan.PipelineConfigError, match="one attention on an SM share"):
    plan.with_beside_share(plan.single(2048, 132), 48)


@pytest.mark.parametrize("lead", [0, 1])
def test_allgather_form_of_o_per_nano_batch(lead):
  cfg = plan.two_nano_batches(2048, 132, [1024, 1024], lead, tp=4, name="t", allgather=(1,))
  assert cfg.name == "t-ag1"
  assert cfg.ops_of(1) == plan.AG_OPS and cfg.ops_of(0) == plan.TP_OPS
  anc = cfg._ancestors()
  assert "attn_allgather@1" in anc["o@1"] and "o@1" in anc["o_allgather@1"] and "o_allgather@1" in anc["gate_up@1"]
  assert plan.PipelineConfig.from_dict(json.loads(cfg.to_json())).ops_of(1) == plan.AG_OPS   # round trip
  d = json.loads(cfg.to_json())
  d["ops"] = [o for o in d["ops"] if o["op"] != "o_allgather"]
  with pytest.raises(plan.PipelineConfigError, match="missing"):
    plan.PipelineConfig.from_dict(d)
  with pytest.raises(plan.PipelineConfigError, match="tensor parallelism"):
    plan.generic_default(2048, 132, allgather=(0,))
  both = plan.generic_default(2048, 132, tp=2, allgather=(0, 1))
  assert both.ops_of(0) == both.ops_of(1) == plan.AG_OPS and both.name == "generic-2-tp2-ag01"


def test_beside_attention_round_trips_and_old_files_load_without_it(tmp_path):
  """A plan can carry the decode attention variant its shares were measured with; files written before
  the field existed load with none; options the host depends on, or values that are not integers, are
  refused with the reason."""
  cfg = plan.generic_default(2048, 132)
  cfg.beside_attention = {"prefetch_pages": 1, "num_stages": 3, "programs_per_sm": 1}
  assert plan.PipelineConfig.from_dict(json.loads(cfg.to_json())) == cfg
  assert plan.with_beside_share(cfg, 48).beside_attention == cfg.beside_attention
  old = _cfg_dict()
  del old["beside_attention"]
  assert plan.PipelineConfig.from_dict(old).beside_attention == {}
  for bad in ({"block_n": 64}, {"num_stages": "3"}):
    d = _cfg_dict()
    d["beside_attention"] = bad
    with pytest.raises(plan.PipelineConfigError, match="beside_attention"):
      plan.PipelineConfig.from_dict(d)
