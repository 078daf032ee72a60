"""A whole LAION-CLAP `ClapModel` imported into `HadeModel` equals HF's PyTorch model.

A small random ClapModel (no download) is saved as an HF folder and loaded with
`convert.clap.load_clap`; both towers' hidden states, the pooled outputs, the projected
embeddings (`get_audio_features` / `get_text_features`) and the text-to-audio logits agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import ClapConfig, ClapModel

from hade_jax import heads as hade_heads
from hade_jax.convert import clap as convert_clap
from tests import hf_reference

TOL = 1e-4
AUDIO = dict(spec_size=128, num_mel_bins=32, patch_embeds_hidden_size=16, hidden_size=128,
             depths=[1, 1, 2, 1], num_attention_heads=[2, 2, 4, 4], window_size=4)
TEXT = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1,
            layer_norm_eps=1e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  torch.manual_seed(0)
  model = ClapModel(ClapConfig(audio_config=AUDIO, text_config=TEXT, projection_dim=24))
  hf_reference.randomize_(model)
  folder = tmp_path_factory.mktemp("clap")
  model.save_pretrained(folder)
  return model, folder


def inputs(seed=0):
  rng = np.random.RandomState(seed)
  mel = (rng.randn(3, 512, 32) * 15.0 - 40.0).astype(np.float32)
  lengths = [9, 4, 12, 1]
  ids = rng.randint(3, 120, size=(4, 12))
  ids[:, 0] = 0  # <s>
  mask = (np.arange(12)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
  ids = np.where(mask > 0, ids, 1)  # pad id
  return mel, ids, mask


def test_clap_model_imports_exactly(reference):
  ref, folder = reference
  model, report = convert_clap.load_clap(folder)
  assert not report.missing and not report.unused, str(report)
  assert "logit_scale_a" in report.expected_unused
  mel, ids, mask = inputs()

  with torch.no_grad():
    ref_audio = ref.audio_model(torch.from_numpy(mel)[:, None], output_hidden_states=True)
    ref_text = ref.text_model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                              output_hidden_states=True)
    ref_audio_emb = ref.get_audio_features(input_features=torch.from_numpy(mel)[:, None])
    ref_text_emb = ref.get_text_features(input_ids=torch.from_numpy(ids),
                                         attention_mask=torch.from_numpy(mask))
    ref_out = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  input_features=torch.from_numpy(mel)[:, None])
  ref_audio_emb = getattr(ref_audio_emb, "pooler_output", ref_audio_emb)
  ref_text_emb = getattr(ref_text_emb, "pooler_output", ref_text_emb)

  pooled, aux = jax.jit(lambda m: model.audio_encoder(m))(jnp.asarray(mel))
  np.testing.assert_allclose(pooled, ref_audio.pooler_output.numpy(), atol=TOL, rtol=0)
  for i, (got, want) in enumerate(zip(aux["hidden_states"], ref_audio.hidden_states,
                                      strict=True)):
    np.testing.assert_allclose(got, want.numpy(), atol=TOL, rtol=0, err_msg=f"audio {i}")

  final, taux = jax.jit(lambda i, m: model.text_encoder(i, m))(jnp.asarray(ids), jnp.asarray(mask))
  valid = mask.astype(bool)
  for i, (got, want) in enumerate(zip(taux["hidden_states"], ref_text.hidden_states,
                                      strict=True)):
    np.testing.assert_allclose(np.asarray(got)[valid], want.numpy()[valid], atol=TOL, rtol=0,
                               err_msg=f"text {i}")
  np.testing.assert_allclose(taux["pooled"], ref_text.pooler_output.numpy(), atol=TOL, rtol=0)

  a = jax.jit(lambda m: model.encode_audio_mel(m))(jnp.asarray(mel))
  t = jax.jit(lambda i, m: model.encode_text(i, m))(jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(hade_heads.normalize(a.global_AxD), ref_audio_emb.numpy(),
                             atol=TOL, rtol=0)
  np.testing.assert_allclose(hade_heads.normalize(t.global_TxD), ref_text_emb.numpy(),
                             atol=TOL, rtol=0)
  # CLAP's text->audio logits: exp(logit_scale_t) * cosine of the projected embeddings.
  logits_AxT = model.heads.logit_scale_value() * model.score(a, t)["global"]
  np.testing.assert_allclose(logits_AxT.T, ref_out.logits_per_text.numpy(), atol=TOL * 20,
                             rtol=1e-5)


def test_clap_heads_follow_the_checkpoint_depth(reference):
  _, folder = reference
  model, _ = convert_clap.load_clap(folder, num_factors=4)
  cfg = model.cfg
  assert cfg.heads.embed_dim == 24 and cfg.heads.projection == "clap"
  assert cfg.heads.levels == ((2, 1), (3, 2), (4, 3))
  assert cfg.text.variant == "roberta"
  assert cfg.audio.stage_widths == (16, 32, 64, 128)
