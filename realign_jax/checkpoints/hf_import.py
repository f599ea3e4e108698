"""The names checkpoints/manager.py and run_dir.py still read from here; see checkpoints/hf/."""

# NOTE: temporary shim, removed once checkpoints/run_dir.py and manager.py import checkpoints.hf
from realign_jax.checkpoints.hf.files import is_hf_dir
from realign_jax.checkpoints.hf.load import hf_model_config, hf_params
from realign_jax.data.hf_tokenizer import hf_vocabularies, hf_vocabulary

__all__ = ["is_hf_dir", "hf_model_config", "hf_params", "hf_vocabulary", "hf_vocabularies"]
