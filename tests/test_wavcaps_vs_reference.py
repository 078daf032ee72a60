"""WavCaps' HTS-AT + BERT retrieval checkpoints imported with `convert.wavcaps.load_wavcaps`
equal a reference in WavCaps' layout.

WavCaps has no PyPI package; its `retrieval/models` (ase_model.py, audio_encoder.py,
text_encoder.py, htsat.py, feature_extractor.py) define the key names:
  ASE.audio_encoder.audio_enc   HTS-AT (Chen et al.'s module names; the torchlibrosa front end
                                as `audio_feats_extractor.{mel_trans,log_trans}`), returning the
                                pooled `embedding`
  ASE.text_encoder.text_encoder BertModel(add_pooling_layer=False)
  ASE.audio_proj / text_proj    nn.Sequential(Linear, ReLU, Linear)
  ASE.temp                      similarity = a @ t.T / temp
The reference below rebuilds that layout from laion-clap's HTS-AT (the same original code) and
transformers' BertModel, small and random, and is saved as WavCaps' train.py saves it.
"""

import types

import jax
import numpy as np
import pytest
import torch
import transformers
from torch import nn

from hade_jax import frontend
from hade_jax import heads as hade_heads
from hade_jax.convert import common, wavcaps
from tests import original_reference

TOL = 1e-4
MEL = frontend.LogMelConfig(sample_rate=16000, n_fft=512, hop_length=160, n_mels=32,
                            f_min=50.0, f_max=8000.0)
CONFIG = {  # WavCaps' settings YAML, shrunk
    "embed_size": 24, "temp": 0.07, "embed_regularization": True,
    "audio_args": {"sr": 16000, "n_fft": 512, "hop_length": 160, "f_min": 50, "f_max": 8000,
                   "n_mels": 32, "max_length": 5, "mono": True},
    "audio_encoder_args": {"type": "transformer", "model": "htsat", "pretrained": False,
                           "freeze": False},
    "text_encoder_args": {"type": "bert-base-uncased", "freeze": False},
}
TEXT = transformers.BertConfig(vocab_size=120, hidden_size=128, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64,
                               max_position_embeddings=40)


class Ase(nn.Module):
  """WavCaps' ASE retrieval model, key for key."""

  def __init__(self, swin):
    super().__init__()
    self.audio_encoder = nn.Module()
    front = nn.Module()
    front.mel_trans, front.log_trans = swin.spectrogram_extractor, swin.logmel_extractor
    del swin.spectrogram_extractor, swin.logmel_extractor
    swin.audio_feats_extractor = front
    self.audio_encoder.audio_enc = swin
    self.text_encoder = nn.Module()
    self.text_encoder.text_encoder = transformers.BertModel(TEXT, add_pooling_layer=False)
    embed, width = CONFIG["embed_size"], swin.num_features
    self.audio_proj = nn.Sequential(nn.Linear(width, embed), nn.ReLU(), nn.Linear(embed, embed))
    self.text_proj = nn.Sequential(nn.Linear(TEXT.hidden_size, embed), nn.ReLU(),
                                   nn.Linear(embed, embed))
    self.temp = nn.Parameter(torch.ones([]) * CONFIG["temp"])

  def audio_outputs(self, wave):
    swin = self.audio_encoder.audio_enc
    x = swin.audio_feats_extractor.log_trans(swin.audio_feats_extractor.mel_trans(wave))
    mel = x[:, 0]
    x = swin.bn0(x.transpose(1, 3)).transpose(1, 3)
    return mel, swin.forward_features(swin.reshape_wav2img(x))

  def encode_audio(self, wave):
    return nn.functional.normalize(self.audio_proj(self.audio_outputs(wave)[1]["embedding"]),
                                   dim=-1)

  def encode_text(self, ids, mask):
    states = self.text_encoder.text_encoder(input_ids=ids, attention_mask=mask)[0]
    return nn.functional.normalize(self.text_proj(states[:, 0, :]), dim=-1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  htsat_module, _ = original_reference.laion_clap_modules()
  torch.manual_seed(0)
  audio_cfg = types.SimpleNamespace(mel_bins=32, sample_rate=16000, window_size=512,
                                    hop_size=160, fmin=50, fmax=8000)
  ref = original_reference.randomize_(Ase(original_reference.small_htsat(htsat_module,
                                                                         audio_cfg)))
  path = tmp_path_factory.mktemp("wavcaps") / "HTSAT-BERT-PT.pt"
  torch.save({"model": ref.state_dict(), "optimizer": {"state": {}, "param_groups": []},
              "config": CONFIG, "epoch": 7}, path)
  return ref, path


def _inputs(seed=0):
  rng = np.random.RandomState(seed)
  wave = (0.3 * rng.randn(2, 511 * 160)).astype(np.float32)
  lengths = [9, 4, 12]
  ids = rng.randint(3, 120, size=(3, 12))
  ids[:, 0] = 101  # [CLS]
  mask = (np.arange(12)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
  return wave, np.where(mask > 0, ids, 0), mask


def test_wavcaps_checkpoint_imports_exactly(reference):
  ref, path = reference
  model, report = wavcaps.load_wavcaps(path)
  assert not report.missing and not report.unused, str(report)
  assert "temp" in report.loaded and "text_proj.2.weight" in report.loaded
  assert "audio_encoder.audio_enc.audio_feats_extractor.log_trans.melW" in report.expected_unused
  cfg = model.cfg
  assert cfg.mel == MEL  # from the checkpoint's config.audio_args
  assert cfg.heads.text_pool == "cls" and not cfg.text.add_pooler
  assert cfg.text.variant == "bert" and cfg.heads.embed_dim == CONFIG["embed_size"]
  assert cfg.text.num_attention_heads == TEXT.num_attention_heads  # width 128 / 64

  wave, ids, mask = _inputs()
  swin = ref.audio_encoder.audio_enc
  with torch.no_grad():
    w = torch.from_numpy(wave)
    (ref_mel, ref_out), captured = original_reference.stage_outputs(
        swin, lambda: ref.audio_outputs(w))
    ref_text = ref.text_encoder.text_encoder(input_ids=torch.from_numpy(ids),
                                             attention_mask=torch.from_numpy(mask),
                                             output_hidden_states=True)
    ref_a = ref.encode_audio(w).numpy()
    ref_t = ref.encode_text(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    ref_sim_t2a = ref_t @ ref_a.T / ref.temp.item()

  @jax.jit
  def run(mel, ids, mask):
    return (model.audio_encoder(mel), model.text_encoder(ids, mask),
            model.encode_audio_mel(mel), model.encode_text(ids, mask))

  (pooled, aux), (_, taux), a, t = run(ref_mel.numpy(), ids, mask)
  original_reference.assert_stages_match(pooled, aux, captured, ref_out, TOL)
  valid = mask.astype(bool)
  for i, (got, want) in enumerate(zip(taux["hidden_states"], ref_text.hidden_states,
                                      strict=True)):
    np.testing.assert_allclose(np.asarray(got)[valid], want.numpy()[valid], atol=TOL, rtol=0,
                               err_msg=f"text hidden_states[{i}]")
  np.testing.assert_allclose(hade_heads.normalize(a.global_AxD), ref_a, atol=TOL, rtol=0)
  np.testing.assert_allclose(hade_heads.normalize(t.global_TxD), ref_t, atol=TOL, rtol=0)
  # WavCaps' similarity divides by temp: hade_jax's logit scale is ln(1 / temp).
  sim_AxT = model.heads.logit_scale_value() * model.score(a, t)["global"]
  np.testing.assert_allclose(np.asarray(sim_AxT).T, ref_sim_t2a, atol=TOL * 20, rtol=1e-5)


def test_wavcaps_errors(reference):
  ref, path = reference
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  model, _ = wavcaps.load_wavcaps(path)
  with pytest.raises(common.ConversionError, match=r"temp"):
    wavcaps.import_wavcaps(model, {k: v for k, v in state.items() if k != "temp"})
  with pytest.raises(common.ConversionError, match="text_pool='cls'"):
    wavcaps.load_wavcaps(path, text_pool="mean")
  with pytest.raises(common.ConversionError, match="audio_args"):
    wavcaps.mel_from_config({"audio_args": {"sr": 16000, "f_max": 9000}})
