"""BertModel against random-init HF BertModel / RobertaModel / ClapTextModel (eval mode)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from hade_jax import bert
from hade_jax.convert import bert as convert_bert
from hade_jax.convert import common

TOL = 1e-4
SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
             intermediate_size=37, max_position_embeddings=40)
# Valid tokens per row: a full row, padded rows, and a row with [CLS] only.
LENGTHS = (13, 9, 4, 2, 1)
KINDS = ("bert", "roberta", "clap_text")


def _randomize(model, seed):
  """Every float tensor random (HF zero-inits biases, sets LayerNorm to identity)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for key, value in model.state_dict().items():
      if not value.is_floating_point():
        continue
      noise = torch.randn(value.shape, generator=gen)
      value.copy_(1.0 + 0.2 * noise if key.endswith("LayerNorm.weight") else 0.3 * noise)
  return model.eval()


def _reference(kind, seed=0, **hf_kwargs):
  kwargs = {**SMALL, **hf_kwargs}
  if kind == "bert":
    pooler = kwargs.pop("add_pooling_layer", True)
    model = transformers.BertModel(transformers.BertConfig(**kwargs), add_pooling_layer=pooler)
  elif kind == "roberta":  # type_vocab_size stays HF's default 2: segment ids are exercised
    model = transformers.RobertaModel(transformers.RobertaConfig(**kwargs))
  else:  # CLAP's text tower: RoBERTa with pad id 1 and a single token type
    model = transformers.ClapTextModel(transformers.ClapTextConfig(**kwargs))
  return _randomize(model, seed)


def _batch(cfg, seed=0, lengths=LENGTHS):
  """Right-padded random ids as a tokenizer makes them: pad id at padded positions.

  One valid token of the second row is the pad id itself: RoBERTa gives it position
  pad_token_id (its positions follow the ids, not the mask), and so must we.
  """
  rng = np.random.RandomState(seed)
  b, m = len(lengths), max(lengths)
  ids = rng.randint(0, cfg.vocab_size, (b, m))
  ids[ids == cfg.pad_token_id] = cfg.pad_token_id + 1
  mask = (np.arange(m)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
  ids = np.where(mask == 1, ids, cfg.pad_token_id)
  ids[1, 3] = cfg.pad_token_id
  types = rng.randint(0, cfg.type_vocab_size, (b, m)) * mask
  return ids, mask, types


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, ids, mask, types, dropout_key):
  # One jitted function for every test: models of one geometry share a graphdef, so each
  # (config, input shape) compiles once per session.
  rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)
  return nnx.merge(graphdef, state)(ids, mask, types, rngs=rngs)


def _jit_forward(model):
  graphdef, state = nnx.split(model)

  def forward(ids, mask, types=None, dropout_key=None):
    return _apply(graphdef, state, jnp.asarray(ids), jnp.asarray(mask),
                  None if types is None else jnp.asarray(types), dropout_key)

  return forward


def _max_errors(forward, ref_model, ids, mask, types):
  """Max abs error of every hidden state and of the pooler against HF (all positions)."""
  with torch.no_grad():
    ref = ref_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    token_type_ids=None if types is None else torch.from_numpy(types),
                    output_hidden_states=True)
  final, aux = forward(ids, mask, types)
  num_layers = ref_model.config.num_hidden_layers
  assert len(aux["hidden_states"]) == len(ref.hidden_states) == num_layers + 1
  errors = {}
  for i, (got, want) in enumerate(zip(aux["hidden_states"], ref.hidden_states, strict=True)):
    assert got.shape == tuple(want.shape), f"hidden_states[{i}]"
    errors[f"hidden_states[{i}]"] = float(np.abs(np.asarray(got) - want.numpy()).max())
  last = ref.last_hidden_state.numpy()
  errors["last_hidden_state"] = float(np.abs(np.asarray(final) - last).max())
  if ref.pooler_output is None:
    assert aux["pooled"] is None
  else:
    errors["pooled"] = float(np.abs(np.asarray(aux["pooled"]) - ref.pooler_output.numpy()).max())
  return errors


def _assert_matches(forward, ref_model, ids, mask, types):
  errors = _max_errors(forward, ref_model, ids, mask, types)
  bad = {k: v for k, v in errors.items() if not v <= TOL}
  assert not bad, f"errors above {TOL}: {bad}"
  return errors


@pytest.fixture(scope="module", params=KINDS)
def reference(request):
  return request.param, _reference(request.param)


@pytest.fixture(scope="module")
def safetensors_folder(tmp_path_factory, reference):
  kind, ref_model = reference
  folder = tmp_path_factory.mktemp(f"{kind}_safetensors")
  ref_model.save_pretrained(folder)
  assert (folder / "model.safetensors").is_file()
  return folder


def test_safetensors_folder_matches_reference(reference, safetensors_folder):
  kind, ref_model = reference
  model, cfg, report = convert_bert.load_text_tower(safetensors_folder)
  assert cfg.variant == ("bert" if kind == "bert" else "roberta")
  assert cfg.add_pooler and cfg.num_hidden_layers == 3
  assert not report.missing and not report.unused
  assert len(report.loaded) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  forward = _jit_forward(model)
  ids, mask, types = _batch(cfg)
  _assert_matches(forward, ref_model, ids, mask, types)
  _assert_matches(forward, ref_model, ids, mask, None)  # HF's default segment ids (zeros)


def test_pytorch_bin_folder_matches_reference(tmp_path, reference, safetensors_folder):
  kind, ref_model = reference
  (tmp_path / "config.json").write_text((safetensors_folder / "config.json").read_text())
  torch.save(ref_model.state_dict(), tmp_path / "pytorch_model.bin")
  model, cfg, report = convert_bert.load_text_tower(tmp_path)
  assert not report.missing and not report.unused
  if kind == "clap_text":  # CLAP saves its id buffers (persistent); they have no counterpart
    assert report.expected_unused == ["embeddings.position_ids", "embeddings.token_type_ids"]
  _assert_matches(_jit_forward(model), ref_model, *_batch(cfg, seed=1))


def test_padding_never_reaches_valid_tokens(reference, safetensors_folder):
  model, cfg, _ = convert_bert.load_text_tower(safetensors_folder)
  forward = _jit_forward(model)
  ids, mask, types = _batch(cfg, seed=2)
  rng = np.random.RandomState(3)
  noisy_ids = np.where(mask == 1, ids, rng.randint(cfg.pad_token_id + 1, cfg.vocab_size, ids.shape))
  noisy_types = np.where(mask == 1, types, rng.randint(0, cfg.type_vocab_size, ids.shape))
  _, clean = forward(ids, mask, types)
  _, noisy = forward(noisy_ids, mask, noisy_types)
  valid = mask.astype(bool)
  for i, (a, b) in enumerate(zip(clean["hidden_states"], noisy["hidden_states"], strict=True)):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a[valid], b[valid], rtol=0, atol=1e-6, err_msg=f"layer {i}")
    assert np.abs(a[~valid] - b[~valid]).max() > 1e-3  # the padded positions did change
  np.testing.assert_allclose(np.asarray(clean["pooled"]), np.asarray(noisy["pooled"]),
                             rtol=0, atol=1e-6)


def test_jit_matches_eager():
  ref_model = _reference("roberta")
  cfg = bert.BertConfig.from_hf(ref_model.config.to_dict())
  model = bert.BertModel(cfg, rngs=nnx.Rngs(0))
  convert_bert.import_bert(model, {k: v.numpy() for k, v in ref_model.state_dict().items()})
  ids, mask, types = (jnp.asarray(x) for x in _batch(cfg, seed=4))
  eager_final, eager_aux = model(ids, mask, types)
  jit_final, jit_aux = nnx.jit(lambda m, *a: m(*a))(model, ids, mask, types)
  np.testing.assert_allclose(np.asarray(jit_final), np.asarray(eager_final), rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(jit_aux["pooled"]), np.asarray(eager_aux["pooled"]),
                             rtol=0, atol=1e-5)
  _assert_matches(lambda *a: (eager_final, eager_aux), ref_model, *_batch(cfg, seed=4))


def test_clap_model_folder(tmp_path):
  """A ClapModel folder: text_config is read, 'text_model.' found, audio keys not counted."""
  audio = dict(spec_size=64, num_mel_bins=16, patch_embeds_hidden_size=8, hidden_size=32,
               depths=[1, 1], num_attention_heads=[1, 2], window_size=4)
  text = {k: v for k, v in SMALL.items()}
  torch.manual_seed(0)
  clap = transformers.ClapModel(transformers.ClapConfig(text_config=text, audio_config=audio,
                                                        projection_dim=16))
  _randomize(clap, seed=5).save_pretrained(tmp_path)
  model, cfg, report = convert_bert.load_text_tower(tmp_path)
  assert cfg.variant == "roberta" and cfg.pad_token_id == 1 and cfg.type_vocab_size == 1
  assert not report.missing and not report.unused
  assert report.expected_unused == ["text_model.embeddings.position_ids",
                                    "text_model.embeddings.token_type_ids"]
  assert all(k.startswith("text_model.") for k in report.loaded)
  _assert_matches(_jit_forward(model), clap.text_model, *_batch(cfg, seed=6))


def test_checkpoint_without_pooler(tmp_path):
  ref_model = _reference("bert", add_pooling_layer=False)
  ref_model.save_pretrained(tmp_path)
  model, cfg, report = convert_bert.load_text_tower(tmp_path)
  assert not cfg.add_pooler and model.pooler is None and not report.missing
  ids, mask, types = _batch(cfg)
  _assert_matches(_jit_forward(model), ref_model, ids, mask, types)

  # A tower built with a pooler keeps an initialised one, and the report says so...
  _, state = common.load_hf_folder(tmp_path)
  with_pooler = bert.BertModel(dataclasses.replace(cfg, add_pooler=True),
                               rngs=nnx.Rngs(0))
  report = convert_bert.import_bert(with_pooler, state)
  assert report.missing == ["pooler/dense/kernel (expected pooler.dense.weight)",
                            "pooler/dense/bias (expected pooler.dense.bias)"]
  assert "2 missing" in str(report)
  # ...or refuses, pointing at the fix.
  with pytest.raises(common.ConversionError, match="add_pooler=False"):
    convert_bert.import_bert(with_pooler, state, allow_missing_pooler=False)
  # load_text_tower(add_pooler=True) is the same choice made from a folder.
  _, forced_cfg, forced_report = convert_bert.load_text_tower(tmp_path, add_pooler=True)
  assert forced_cfg.add_pooler and len(forced_report.missing) == 2


@pytest.mark.parametrize("head, prefix", [
    ("BertForMaskedLM", "bert."), ("RobertaForMaskedLM", "roberta.")])
def test_prefixed_checkpoint(head, prefix):
  hf_cfg = (transformers.BertConfig if head.startswith("Bert") else transformers.RobertaConfig)(
      **SMALL)
  torch.manual_seed(0)
  ref_model = getattr(transformers, head)(hf_cfg).eval()
  state = {k: v.numpy() for k, v in ref_model.state_dict().items()}
  assert convert_bert.detect_prefix(state) == prefix
  # *ForMaskedLM has no pooler: leave it out of the tower.
  cfg = bert.BertConfig.from_hf(hf_cfg.to_dict(), add_pooler=False)
  model = bert.BertModel(cfg, rngs=nnx.Rngs(0))
  report = convert_bert.import_bert(model, state)
  assert not report.missing and not report.unused  # the LM head is outside the prefix
  encoder = getattr(ref_model, prefix[:-1])
  _assert_matches(_jit_forward(model), encoder, *_batch(cfg))

  other = "roberta" if cfg.variant == "bert" else "bert"
  wrong = bert.BertModel(dataclasses.replace(cfg, variant=other), rngs=nnx.Rngs(0))
  with pytest.raises(common.ConversionError, match="position ids would be wrong"):
    convert_bert.import_bert(wrong, state)


def test_legacy_gamma_beta_names():
  """TF-era BERT files name LayerNorm parameters gamma/beta; HF reads them, so do we."""
  ref_model = _reference("bert")
  state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                      "LayerNorm.beta"): v.numpy()
           for k, v in ref_model.state_dict().items()}
  assert sum(k.endswith("gamma") for k in state) == 1 + 2 * SMALL["num_hidden_layers"]
  cfg = bert.BertConfig.from_hf(ref_model.config.to_dict())
  model = bert.BertModel(cfg, rngs=nnx.Rngs(0))
  report = convert_bert.import_bert(model, state)
  assert not report.missing and not report.unused
  _assert_matches(_jit_forward(model), ref_model, *_batch(cfg))


def test_import_errors():
  ref_model = _reference("bert")
  state = {k: v.numpy() for k, v in ref_model.state_dict().items()}
  cfg = bert.BertConfig.from_hf(ref_model.config.to_dict())

  wider = dataclasses.replace(cfg, intermediate_size=38)
  with pytest.raises(common.ConversionError,
                     match=r"encoder\.layer\.0\.intermediate\.dense\.weight \(37, 32\)"):
    convert_bert.import_bert(bert.BertModel(wider, rngs=nnx.Rngs(0)), state)

  missing_key = "encoder.layer.1.output.LayerNorm.bias"
  partial = {k: v for k, v in state.items() if k != missing_key}
  with pytest.raises(common.ConversionError, match=missing_key.replace(".", r"\.")):
    convert_bert.import_bert(bert.BertModel(cfg, rngs=nnx.Rngs(0)), partial)
  report = convert_bert.import_bert(bert.BertModel(cfg, rngs=nnx.Rngs(0)), partial, strict=False)
  assert report.missing == [f"encoder/layer/1/output/LayerNorm/bias (expected {missing_key})"]

  extra = dict(state, **{"encoder.layer.9.output.dense.weight": np.zeros((2, 2), np.float32)})
  report = convert_bert.import_bert(bert.BertModel(cfg, rngs=nnx.Rngs(0)), extra)
  assert report.unused == ["encoder.layer.9.output.dense.weight"]

  with pytest.raises(common.ConversionError, match="no BERT/RoBERTa text tower"):
    convert_bert.import_bert(bert.BertModel(cfg, rngs=nnx.Rngs(0)), {"foo.weight": np.zeros(1)})


def test_config_from_hf():
  bert_dict = transformers.BertConfig(**SMALL).to_dict()
  assert bert.BertConfig.from_hf(bert_dict) == bert.BertConfig(**SMALL)
  roberta = bert.BertConfig.from_hf(transformers.RobertaConfig(**SMALL).to_dict())
  assert roberta == bert.BertConfig(**SMALL, variant="roberta", pad_token_id=1)
  assert roberta.max_length == SMALL["max_position_embeddings"] - 2
  clap = transformers.ClapConfig().to_dict()
  clap_text = bert.BertConfig.from_hf(clap)
  assert clap_text == bert.BertConfig.from_hf(clap["text_config"])
  # LAION-CLAP's text tower is roberta-base but for HF's LayerNorm eps default.
  assert clap_text == bert.BertConfig.roberta_base(layer_norm_eps=1e-12)
  assert clap_text.max_length == 512
  assert bert.BertConfig.from_hf(bert_dict, add_pooler=False, dtype=jnp.bfloat16).dtype == (
      jnp.bfloat16)

  for field, value in [("position_embedding_type", "relative_key"), ("is_decoder", True),
                       ("add_cross_attention", True), ("hidden_act", "gelu_fast"),
                       ("model_type", "gpt2")]:
    with pytest.raises(ValueError, match=field):
      bert.BertConfig.from_hf({**bert_dict, field: value})
  with pytest.raises(ValueError, match="pad_token_id"):
    bert.BertConfig.from_hf({**transformers.RobertaConfig().to_dict(), "pad_token_id": None})
  with pytest.raises(ValueError, match="num_attention_heads"):
    bert.BertConfig(hidden_size=30, num_attention_heads=4)
  with pytest.raises(ValueError, match="variant"):
    bert.BertConfig(variant="albert")


def test_presets_build():
  for preset in (bert.BertConfig.bert_base, bert.BertConfig.roberta_base,
                 bert.BertConfig.minilm_l6, bert.BertConfig.small_test):
    cfg = preset()
    shapes = nnx.eval_shape(lambda cfg=cfg: bert.BertModel(cfg, rngs=nnx.Rngs(0)))
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(shapes))}
    assert f"encoder/layer/{cfg.num_hidden_layers - 1}/attention/self/query/kernel" in paths
    assert "embeddings/LayerNorm/scale" in paths and "pooler/dense/bias" in paths
  params = nnx.state(nnx.eval_shape(lambda: bert.BertModel(bert.BertConfig.bert_base(),
                                                           rngs=nnx.Rngs(0))), nnx.Param)
  assert sum(np.prod(x.shape) for x in jax.tree.leaves(params)) == 109_482_240  # bert-base


def test_rejects_inputs_past_the_position_table():
  model = bert.BertModel(bert.BertConfig.small_test(max_position_embeddings=8), rngs=nnx.Rngs(0))
  ids = jnp.ones((1, 9), jnp.int32)
  with pytest.raises(ValueError, match="9 tokens exceed the 8 positions"):
    model(ids, jnp.ones_like(ids))


def test_dropout_and_bf16():
  cfg = bert.BertConfig.small_test()
  forward = _jit_forward(bert.BertModel(cfg, rngs=nnx.Rngs(0)))
  batch = _batch(cfg)
  eval_out, _ = forward(*batch)
  train_a, _ = forward(*batch, dropout_key=jax.random.key(7))
  train_b, _ = forward(*batch, dropout_key=jax.random.key(7))
  train_c, _ = forward(*batch, dropout_key=jax.random.key(8))
  np.testing.assert_array_equal(np.asarray(train_a), np.asarray(train_b))  # same key, same masks
  assert np.abs(np.asarray(train_a) - np.asarray(train_c)).max() > 1e-2
  assert np.abs(np.asarray(train_a) - np.asarray(eval_out)).max() > 1e-2

  half = bert.BertModel(dataclasses.replace(cfg, dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
  assert {v.dtype for v in jax.tree.leaves(nnx.state(half))} == {jnp.dtype(jnp.float32)}
  half_out, aux = _jit_forward(half)(*batch)
  assert half_out.dtype == jnp.bfloat16 and aux["pooled"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half_out, np.float32), np.asarray(eval_out), atol=0.1)


def test_mean_pool_and_normalize():
  rng = np.random.RandomState(0)
  hidden = rng.randn(3, 5, 4).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
  pooled = np.asarray(bert.mean_pool(jnp.asarray(hidden), jnp.asarray(mask)))
  np.testing.assert_allclose(pooled[0], hidden[0, :3].mean(0), rtol=1e-6)
  np.testing.assert_allclose(pooled[1], hidden[1].mean(0), rtol=1e-6)
  np.testing.assert_array_equal(pooled[2], np.zeros(4))  # no valid token: zeros, not NaN
  unit = np.asarray(bert.l2_normalize(jnp.asarray(pooled)))
  np.testing.assert_allclose(np.linalg.norm(unit[:2], axis=1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(unit[2], np.zeros(4))
