"""Hugging Face safetensors checkpoints: import into, and export from, our params.

Supported releases: T5.1.1-style encoder-decoders (`model_type` "t5" with
`feed_forward_proj` "gated-gelu": t5-v1_1, flan-t5, ...) and decoder-only
Llama/Mistral models (`model_type` "llama" / "mistral").

  from realign_jax.checkpoints.hf import export, load
  config, params = load.load_hf_checkpoint("/ckpt/flan-t5-base")
  lm = LanguageModel(config)              # params fit lm.init(...)[0] exactly
  export.export_hf_checkpoint(config, params, "/out/my-model")

A checkpoint directory holds `config.json` and either `model.safetensors` or
`model.safetensors.index.json` (its "weight_map": tensor name -> shard file)
next to the shards; the safetensors codec is `checkpoints/safetensors.py`,
the tokenizer files of such a directory are read by `data/hf_tokenizer.py`.

  files.py       the directory: its file names, `is_hf_dir`, config.json, the
                 shard index, the atomic rename into place
  config.py      config.json <-> T5Config / DecoderConfig (special ids included)
  tensor_map.py  one HF tensor <-> one param leaf (transpose, head split), dtypes
  t5.py          T5's tensor map and the T5 head quirks of transformers 4.x/5.x
  llama.py       the Llama/Mistral tensor map
  families.py    the tensor map, aliases and harmless extras of a model config
  load.py        strict import: `load_hf_checkpoint`, `hf_model_config`, `hf_params`
  export.py      `hf_state_dict`, `write_hf_weights`, `export_hf_checkpoint`
"""
